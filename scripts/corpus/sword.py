"""Read a SWORD "zText" Bible module and turn its OSIS markup into plain text.

Layout of a zText module directory (one set of three files per testament,
ot.* and nt.*), all integers little-endian:
  *.bzs  block index, 12 bytes per block: offset into .bzz, compressed size,
         uncompressed size
  *.bzz  the blocks, each a zlib stream (BlockType=BOOK: one block per book)
  *.bzv  entry index, 10 bytes per entry: block number (u32), offset inside
         the uncompressed block (u32), size (u16).  Entries follow the
         versification: module/testament/book/chapter headings and verses.
Walking the entries in order gives the whole text; chapter boundaries show up
as OSIS <chapter sID=.../> milestones, so no versification table is needed.
"""
import html
import os
import re
import struct
import zlib


def read_entries(moddir):
    """Yield the text of each non-empty entry, testament by testament."""
    for testament in ('ot', 'nt'):
        base = os.path.join(moddir, testament)
        if not os.path.exists(base + '.bzs'):
            continue
        with open(base + '.bzs', 'rb') as f:
            bzs = f.read()
        with open(base + '.bzz', 'rb') as f:
            bzz = f.read()
        with open(base + '.bzv', 'rb') as f:
            bzv = f.read()
        cache = {}
        for i in range(0, len(bzv) - 9, 10):
            block, off, size = struct.unpack_from('<IIH', bzv, i)
            if size == 0:
                continue
            if block not in cache:
                boff, bsize, usize = struct.unpack_from('<III', bzs, 12 * block)
                cache.clear()
                cache[block] = zlib.decompress(bzz[boff:boff + bsize])
            yield cache[block][off:off + size].decode('utf-8', errors='replace')


_DROP = re.compile(r'<note\b[^>]*/>|<note\b.*?</note>|<rdg\b.*?</rdg>', re.S)
# Notes sit between words with no space of their own; so do added words.
_GLUE = re.compile(r'(?:<note\b[^>]*/>|<note\b.*?</note>)(?=<w\b|<transChange\b|[^\W\d_])'
                   r'|(?<=</w>)(?=<transChange\b)|(?<=</transChange>)(?=<w\b)', re.S)
_CHAPTER = re.compile(r'<chapter\b[^>]*\bsID="([^"]*)"[^>]*/>')
_BOOKNAME = re.compile(r'<milestone\b[^>]*type="x-usfm-h"[^>]*/>|<milestone\b[^>]*n="[^"]*"[^>]*type="x-usfm-h"[^>]*/>')
_TITLE = re.compile(r'<title\b([^>]*)>(.*?)</title>', re.S)
_PARA = re.compile(r'<div\b[^>]*type="x-p"[^>]*/>|<lb\b[^>]*type="x-p"[^>]*/>|<lg\b[^>]*/?>|</lg>'
                   r'|<div\b[^>]*type="(?:book|introduction|front|glossary)"[^>]*/>|<list\b[^>]*>|</list>')
_LINE = re.compile(r'<l\b[^>]*\beID="[^>]*/>|<l\b[^>]*[^/]>|<l>|</l>|<item\b[^>]*>|<lb\b[^>]*/>')
_TAG = re.compile(r'<[^>]*>')
_NAME_ATTR = re.compile(r'\bn="([^"]*)"')


def _clean(markup):
    """OSIS fragment -> text with \n line breaks and \n\n paragraph breaks."""
    s = _GLUE.sub(' ', markup)
    s = _DROP.sub('', s)
    s = _TITLE.sub(lambda m: '' if 'type="main"' in m.group(1) else '\n\n' + m.group(2) + '\n\n', s)
    s = _PARA.sub('\n\n', s)
    s = _LINE.sub('\n', s)
    s = _TAG.sub('', s)
    return html.unescape(s)


def _tidy(text):
    paras = []
    for p in re.split(r'\n\s*\n', text):
        lines = [re.sub(r'[ \t\r]+', ' ', l).strip() for l in p.split('\n')]
        lines = [l for l in lines if l]
        if lines:
            paras.append('\n'.join(lines))
    return '\n\n'.join(paras)


_BOOKDIV = re.compile(r'<div\b[^>]*\bosisID="([^"]*)"[^>]*\bsID="[^"]*"[^>]*type="book"[^>]*/>'
                      r'|<div\b[^>]*\bsID="[^"]*"[^>]*\bosisID="([^"]*)"[^>]*type="book"[^>]*/>'
                      r'|<div\b[^>]*\bsID="[^"]*"[^>]*type="(front|glossary)"[^>]*/>')


# Books whose running head is missing from a module (WEB lost Hosea's).
FALLBACK_NAMES = {'Hos': 'Hosea'}


def chapters(moddir, skip_books=()):
    """Yield (book name, chapter osisID, text) for each chapter; text before a
    book's first chapter (prefaces, introductions) comes with chapter id ''.
    Book names come from the book's x-usfm-h milestone (the running head)."""
    events = re.compile('(?P<div>%s)|(?P<head>%s)|(?P<chap>%s)'
                        % (_BOOKDIV.pattern, _BOOKNAME.pattern, _CHAPTER.pattern))
    names = {}
    state = {'book': '', 'chap': ''}
    buf = []

    def flush():
        t = _tidy(''.join(buf))
        buf.clear()
        abbrev = state['chap'].split('.')[0] if state['chap'] else state['book']
        if abbrev in skip_books or not t:
            return None
        name = names.get(abbrev) or FALLBACK_NAMES.get(abbrev, abbrev)
        return (name, state['chap'], t)

    for entry in read_entries(moddir):
        pos = 0
        for m in events.finditer(entry):
            if m.group('head'):
                nm = _NAME_ATTR.search(m.group(0))
                if nm and state['book'] and not state['chap']:
                    names.setdefault(state['book'], html.unescape(nm.group(1)))
                continue
            buf.append(_clean(entry[pos:m.start()]))
            pos = m.end()
            if m.group('div'):
                r = flush()
                if r:
                    yield r
                b = _BOOKDIV.match(m.group(0))
                state['book'] = b.group(1) or b.group(2) or b.group(3)
                state['chap'] = ''
            else:
                r = flush()
                if r:
                    yield r
                state['chap'] = _CHAPTER.match(m.group(0)).group(1)
        buf.append(_clean(entry[pos:]) + ' ')
    r = flush()
    if r:
        yield r
