"""Plain text from LibreOffice help pages (usr/share/libreoffice/help/LANG).

Only the page body is kept: the part inside <div id="DisplayArea"> up to the
search/donation frames, which leaves out the header, module menu, index,
search bar and debug footer.  Block elements become line breaks; <pre> code
samples keep their layout and are marked so that the language filter can
leave them alone.
"""
import html.parser
import re
import textwrap

BLOCK = {'p', 'div', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'li', 'tr', 'table', 'ul',
         'ol', 'br', 'dt', 'dd', 'section', 'blockquote', 'title', 'header', 'footer'}
CELL = {'td', 'th'}
CODE_MARK = '\x02'   # first character of a line that holds a code sample


class _Text(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines, self.cur, self.skip, self.pre = [], [], 0, 0

    def _end_line(self):
        t = re.sub(r'\s+', ' ', ''.join(self.cur)).strip()
        if t:
            self.lines.append(t)
        self.cur = []

    def handle_starttag(self, tag, attrs):
        if tag in ('script', 'style', 'noscript'):
            self.skip += 1
        elif tag == 'pre':
            self._end_line()
            self.pre += 1
        elif tag in BLOCK and not self.pre:
            self._end_line()
        elif tag in CELL and not self.pre:
            self.cur.append(' ')

    def handle_endtag(self, tag):
        if tag in ('script', 'style', 'noscript'):
            self.skip = max(0, self.skip - 1)
        elif tag == 'pre':
            code = textwrap.dedent(''.join(self.cur).strip('\n')).rstrip()
            if code.strip():
                self.lines.append(CODE_MARK + code)
            self.cur = []
            self.pre = max(0, self.pre - 1)
        elif tag in BLOCK and not self.pre:
            self._end_line()

    def handle_data(self, data):
        if not self.skip:
            self.cur.append(data)

    def close(self):
        super().close()
        self._end_line()


def page_lines(markup):
    """Return the page body as a list of lines (code samples start with
    CODE_MARK)."""
    i = markup.find('id="DisplayArea"')
    if i < 0:
        return []
    i = markup.find('>', i) + 1
    j = markup.find('<div id="SearchFrame"', i)
    if j < 0:
        j = markup.find('<footer', i)
    p = _Text()
    p.feed(markup[i:j if j > 0 else len(markup)])
    p.close()
    return p.lines
