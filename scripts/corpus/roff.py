"""A rough man(7)/mdoc(7) page to plain-text renderer (no groff needed).

It does not lay out text: it drops requests that only affect layout, turns
section headings and paragraph macros into line breaks, joins filled text
into one line per paragraph, keeps no-fill blocks (.nf/.EX) line by line and
replaces the common escapes and special characters.  Good enough to get the
words of a page; not a faithful rendering.
"""
import re

CODE_MARK = '\x02'  # first character of a no-fill (example) paragraph

NAMED = {
    'aq': "'", 'dq': '"', 'lq': '“', 'rq': '”', 'oq': '‘', 'cq': '’', 'Fo': '«',
    'Fc': '»', 'fo': '‹', 'fc': '›', 'bu': '•', 'em': '—', 'en': '–', 'hy': '-',
    'mi': '-', 'co': '©', 'rg': '®', 'tm': '™', 'at': '@', 'rs': '\\', 'ti': '~',
    'ha': '^', 'de': '°', 'ga': '`', 'aa': '´', 'bv': '|', 'ba': '|', 'mu': '×',
    'di': '÷', 'sh': '#', 'Do': '$', 'ct': '¢', 'eu': '€', 'Eu': '€', 'ps': '¶',
    'sc': '§', 'pl': '+', 'eq': '=', 'lt': '<', 'gt': '>', 'la': '⟨', 'ra': '⟩',
    '->': '→', '<-': '←', '>=': '≥', '<=': '≤', '!=': '≠', '+-': '±', 'sl': '/',
    'ul': '_', 'ru': '_', 'br': '|', 'or': '|', 'dg': '†', 'ss': 'ß', "'e": 'é',
    '`e': 'è', '^e': 'ê', "'E": 'É', '`a': 'à', ',c': 'ç', ',C': 'Ç', 'oe': 'œ',
    'OE': 'Œ', 'no': '¬', 'Po': '£', 'Ye': '¥', 'lB': '[', 'rB': ']', 'lC': '{',
    'rC': '}', 'ua': '↑', 'da': '↓', 'u': '', 'fm': '′', 'sd': '″', 'ti ': '~',
}
# Strings that pod2man and friends define (.ds) and use through \*(xx.
STRINGS = {'L"': '“', 'R"': '”', 'C`': "'", "C'": "'", 'Tm': '™', 'PI': 'π',
           'lq': '“', 'rq': '”', 'R': '®', '.': '', '-': '—', 'Aq': "'"}

_ESC = re.compile(r"""\\(?:
      (?P<font>f(?:\[[^\]]*\]|\(..|.))
    | \((?P<n2>..)
    | \[(?P<nb>[^\]]*)\]
    | \*(?:\((?P<s2>..)|\[(?P<sb>[^\]]*)\]|(?P<s1>.))
    | (?P<size>s(?:[+-]?\d+|\([+-]?\d\d|\[[^\]]*\]|'[^']*'))
    | (?P<arg>[hvwlLoXDbZNRS])'[^']*'
    | (?P<reg>[nmgkF](?:\((?:..)|\[[^\]]*\]|[+-]?.))
    | (?P<dollar>\$.)
    | (?P<ch>.)
)""", re.X)

_SIMPLE = {'-': '-', ' ': ' ', '~': ' ', '0': ' ', 'e': '\\', '\\': '\\', 't': '\t',
           '.': '.', "'": "'", '`': '`', '"': ''}


def _escape(m):
    g = m.groupdict()
    if g['font'] or g['size'] or g['arg'] or g['reg'] or g['dollar']:
        return ''
    if g['n2'] is not None:
        return NAMED.get(g['n2'], '')
    if g['nb'] is not None:
        nb = g['nb']
        if re.fullmatch(r'u[0-9A-Fa-f]{4,5}', nb):
            return chr(int(nb[1:], 16))
        return NAMED.get(nb, '')
    s = g['s2'] or g['sb'] or g['s1']
    if s is not None:
        return STRINGS.get(s, '')
    return _SIMPLE.get(g['ch'], '')


def unescape(s):
    return _ESC.sub(_escape, s)


def _args(rest):
    """Split macro arguments, honouring double quotes."""
    out, cur, q, i = [], '', False, 0
    while i < len(rest):
        c = rest[i]
        if c == '\\' and i + 1 < len(rest):
            cur += rest[i:i + 2]
            i += 2
            continue
        if c == '"':
            if q and rest[i + 1:i + 2] == '"':
                cur += '"'
                i += 2
                continue
            q = not q
        elif c in ' \t' and not q:
            if cur:
                out.append(cur)
            cur = ''
        else:
            cur += c
        i += 1
    if cur:
        out.append(cur)
    return out


BREAK = {'PP', 'P', 'LP', 'sp', 'Sp', 'Pp', 'HP', 'TP', 'TQ', 'br', 'Bl', 'El',
         'Bd', 'Ed', 'RS', 'RE', 'Ss', 'Sh', 'SH', 'SS', 'IP', 'It', 'Nd'}
FONT_JOIN = {'BR', 'RB', 'IR', 'RI', 'BI', 'IB', 'SB'}
FONT_SPACE = {'B', 'I', 'SM', 'R'}


def render(src):
    """Return plain text for a man page source, or None for a .so redirect."""
    src = src.replace('\r', '')
    src = re.sub(r'\\\n', '', src)  # continuation lines
    lines = src.split('\n')
    paras, cur = [], []
    nofill = False
    table = 0
    heading_next = False
    tag_next = False
    skip_until = None
    depth = 0

    def flush():
        if cur:
            if nofill:
                text = '\n'.join(l.rstrip() for l in cur).strip('\n')
                # every blank-line-separated piece carries the mark
                text = CODE_MARK + re.sub(r'\n\n+', '\n\n' + CODE_MARK, text)
            else:
                text = re.sub(r'[ \t]+', ' ', ' '.join(cur)).strip()
                text = re.sub(r' ?\x01 ?', '\n', text).strip()
            if text.strip(CODE_MARK + ' \t\n\x01'):
                paras.append(text.replace('\x01', ''))
            cur.clear()

    def text_line(t):
        nonlocal tag_next
        t = unescape(t)
        if tag_next and t.strip():
            tag_next = False
            t = t.strip() + '\x01'
        if nofill:
            cur.append(t)
        elif t.strip():
            cur.append(t.strip())

    for raw in lines:
        if skip_until is not None:
            if raw.strip() == skip_until:
                skip_until = None
            continue
        if depth:
            depth += raw.count('\\{') - raw.count('\\}')
            if depth < 0:
                depth = 0
            continue
        line = re.sub(r'\\".*$|\\#.*$', '', raw)
        if raw.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line[:1] in ('.', "'"):
            body = line[1:].lstrip()
            name = body.split(None, 1)[0] if body.split() else ''
            rest = body[len(name):].strip()
            if name in ('de', 'de1', 'am', 'ig'):
                skip_until = '..'
                continue
            if name in ('if', 'ie', 'el', 'while'):
                if '\\{' in line:
                    depth = line.count('\\{') - line.count('\\}')
                continue
            if name == 'so':
                return None
            if table:
                continue
            if name == 'TS':
                flush()
                table = 1
                continue
            if name == 'TH' or name == 'Dt':
                a = _args(rest)
                if a:
                    paras.append(unescape(a[0]) + ('(%s)' % unescape(a[1]) if len(a) > 1 else ''))
                continue
            if name in ('nf', 'EX', 'Vb', 'Bd'):
                flush()
                nofill = name != 'Bd' or '-literal' in rest or '-unfilled' in rest
                continue
            if name in ('fi', 'EE', 'Ve', 'Ed'):
                flush()
                nofill = False
                continue
            if name in BREAK:
                flush()
                a = _args(rest)
                if name in ('SH', 'SS', 'Sh', 'Ss'):
                    if a:
                        paras.append(unescape(' '.join(a)))
                    else:
                        heading_next = True
                elif name in ('TP', 'TQ'):
                    tag_next = True
                elif name == 'IP' and a:
                    mark = unescape(a[0])
                    if mark.strip() in ('•', '-', '*', 'o', '·'):
                        cur.append(mark.strip())
                    elif mark.strip():
                        cur.append(mark.strip() + '\x01')
                elif name in ('It', 'Nd') and a:
                    text_line(' '.join(_mdoc_words(a)))
                continue
            if name in FONT_JOIN:
                text_line(''.join(_args(rest)))
                continue
            if name in FONT_SPACE:
                if rest:
                    text_line(' '.join(_args(rest)))
                continue
            if name in ('UR', 'MT', 'UE', 'ME'):
                a = _args(rest)
                if name in ('UE', 'ME') and a:
                    if cur:
                        cur[-1] = cur[-1] + unescape(a[0])
                continue
            if name == 'URL':
                a = _args(rest)
                if len(a) > 1:
                    text_line(a[1])
                elif a:
                    text_line(a[0])
                continue
            if len(name) == 2 and name[0].isupper() and name[1].islower():
                a = _mdoc_words(_args(rest))  # mdoc macro: keep its words
                if a:
                    text_line(' '.join(a))
                continue
            continue  # any other request only changes layout
        if table:
            if line.strip().startswith('.TE') or raw.startswith('.TE'):
                table = 0
                continue
            if table == 1:
                # options and format lines end with ';' and '.'
                if line.rstrip().endswith('.'):
                    table = 2
                continue
            row = line.replace('T{', '').replace('T}', '')
            row = re.sub(r'\t+', '  ', unescape(row)).strip()
            if row and not re.fullmatch(r'[_=]+', row):
                paras.append(row)
            continue
        if heading_next:
            heading_next = False
            paras.append(unescape(line).strip())
            continue
        if not line.strip() and not nofill:
            flush()
            continue
        text_line(line)
    flush()
    return '\n\n'.join(p for p in paras if p.strip())


_MDOC_CALLABLE = {'Fl', 'Ar', 'Op', 'Oo', 'Oc', 'Xr', 'Pa', 'Nm', 'Dq', 'Qq', 'Sq', 'Ql', 'Em',
                  'Sy', 'Li', 'Cm', 'Ev', 'Va', 'Fn', 'Fa', 'Ft', 'Er', 'Ic', 'Ns', 'Pq', 'No',
                  'Ux', 'Bx', 'At', 'Tn', 'Aq', 'Brq', 'Bq', 'Dv', 'Xo', 'Xc', 'Ta', 'Ad', 'An',
                  'Lk', 'Mt', 'Ms', 'Sx', 'Vt', 'Cd'}


def _mdoc_words(args):
    out = []
    flag = False
    for a in args:
        if a in _MDOC_CALLABLE or a in ('-width', '-tag', '-compact', '-offset', '-bullet', '-enum', '-item', '-column', '-literal', '-unfilled', 'indent'):
            flag = a == 'Fl'
            continue
        w = unescape(a)
        out.append('-' + w if flag else w)
        flag = False
    return out
