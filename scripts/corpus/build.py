#!/usr/bin/python3
"""Build moe's training corpus from Debian packages unpacked under --root.

    build.py --root DIR --out DIR [--small]

--root holds one directory per package, each made by `dpkg -x PKG.deb DIR/PKG`
(scripts/build_corpus.sh does that).  --out receives one file per domain,
<domain>.txt, whose documents are separated by a line holding only a form
feed.  Documents are put in a fixed pseudo-random order (by a hash of their
name), so any prefix of a file mixes all its sources.  --small keeps about
SMALL_BYTES of each domain, picked in that same order, so the small corpus is
a subset of the full one.
"""
import argparse
import glob
import gzip
import hashlib
import os
import re
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helphtml  # noqa: E402
import rdata  # noqa: E402
import roff  # noqa: E402
import sword  # noqa: E402
from textutil import (CODE, MAX_DOC, MIN_DOC, RepeatCap, clean,  # noqa: E402
                      group_small, mostly_english, split_long)

DOMAINS = ['english', 'german', 'french', 'spanish', 'c', 'python', 'numbers']
SMALL_BYTES = 500_000           # per domain, --small
FULL_CAP_BYTES = 12_000_000     # per domain, full build
CODE_MARK = '\x02'
SEP = '\n\f\n'


class Doc:
    __slots__ = ('source', 'key', 'text')

    def __init__(self, source, key, text):
        self.source, self.key, self.text = source, key, text


def pkgdir(root, pkg):
    d = os.path.join(root, pkg)
    if not os.path.isdir(d):
        sys.exit('build_corpus: package %s is not unpacked under %s' % (pkg, root))
    return d


def read_text(path_or_bytes):
    raw = path_or_bytes
    if isinstance(raw, str):
        with open(raw, 'rb') as f:
            raw = f.read()
    if raw[:2] == b'\x1f\x8b':
        raw = gzip.decompress(raw)
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError:
        return raw.decode('latin-1')


def emit(source, key, text, levels=None):
    """Clean TEXT and yield it as one or more Docs of at most MAX_DOC."""
    text = clean(text)
    if not text.strip():
        return
    parts = split_long(text, MAX_DOC, levels) if levels else split_long(text)
    for i, part in enumerate(parts):
        yield Doc(source, '%s#%d' % (key, i), part)


def grouped(source, items, levels=None, sep='\n\n'):
    """ITEMS: (group, name, text) in order.  Long texts are split, short ones
    joined with their neighbours of the same group (a directory, say)."""
    run, run_group = [], None

    def flush():
        for i, t in enumerate(group_small(run, MIN_DOC, MAX_DOC, sep)):
            yield Doc(source, '%s/%05d' % (run_group, i), t)
    for group, name, text in items:
        text = clean(text)
        if not text.strip():
            continue
        if group != run_group:
            yield from flush()
            run, run_group = [], group
        run.extend(split_long(text, MAX_DOC, levels) if levels else split_long(text))
    yield from flush()


# ---------------------------------------------------------------- English --

_CHAPTER = re.compile(r'^\s*(?:CHAPTER|Chapter)\s+[IVXLC0-9]+\.?\s*$')


def unwrap(lines):
    """Hard-wrapped lines -> one line per paragraph, blank line between."""
    paras, cur = [], []
    for l in lines:
        if l.strip():
            cur.append(l.strip())
        elif cur:
            paras.append(' '.join(cur))
            cur = []
    if cur:
        paras.append(' '.join(cur))
    return '\n\n'.join(paras)


def austen(root):
    base = os.path.join(pkgdir(root, 'r-cran-janeaustenr'),
                        'usr/lib/R/site-library/janeaustenr/data/Rdata')
    books = rdata.character_vectors(base)
    if not books:
        sys.exit('build_corpus: no novels found in %s.rdb' % base)
    for name in sorted(books):
        lines = [l or '' for l in books[name]]
        chapters, cur = [], []
        for l in lines:
            if _CHAPTER.match(l) and any(x.strip() for x in cur):
                # a "VOLUME II" line just before the heading belongs to the new chapter
                tail = []
                while cur and (not cur[-1].strip() or cur[-1].strip().startswith('VOLUME')):
                    tail.insert(0, cur.pop())
                chapters.append(cur)
                cur = tail
            cur.append(l)
        chapters.append(cur)
        if len(chapters) > 1 and sum(len(l) for l in chapters[0]) < 1000:
            chapters[1] = chapters[0] + [''] + chapters[1]  # title page
            del chapters[0]
        for i, ch in enumerate(chapters):
            yield from emit('austen', '%s/%03d' % (name, i), unwrap(ch))


def bible(root, pkg, module, source):
    moddir = os.path.join(pkgdir(root, pkg), 'usr/share/sword/modules/texts/ztext', module)
    n = 0
    intro = ''
    # the Greek Daniel and Esther repeat most of the Hebrew books
    for book, chap, text in sword.chapters(moddir, skip_books=('DanGr', 'EsthGr')):
        n += 1
        if not chap:
            if len(text) < 1000:
                intro = text + '\n\n'  # a book's short heading goes with its first chapter
                continue
            title = book + '\n\n' if book else ''
        else:
            title = '%s %s\n\n' % (book, chap.rsplit('.', 1)[-1])
        yield from emit(source, '%04d' % n, intro + title + text)
        intro = ''
    if n == 0:
        sys.exit('build_corpus: no text found in SWORD module %s' % moddir)


# ------------------------------------------------- German/French/Spanish --

def help_pages(root, lang):
    pkg = 'libreoffice-help-' + lang
    base = os.path.join(pkgdir(root, pkg), 'usr/share/libreoffice/help', lang, 'text')
    files = sorted(glob.glob(os.path.join(base, '**', '*.html'), recursive=True))
    if not files:
        sys.exit('build_corpus: no help pages under %s' % base)
    cap = RepeatCap(limit=3)
    by_module = {}
    for path in files:
        rel = os.path.relpath(path, base)
        lines = []
        for line in helphtml.page_lines(read_text(path)):
            if line.startswith(CODE_MARK):
                lines.append(line[1:])
            elif not mostly_english(line, lang) and cap.allow(line):
                lines.append(line)
        text = clean('\n'.join(lines))
        if len(text) >= 40:
            by_module.setdefault(rel.split(os.sep)[0], []).append((rel, text))
    for module in sorted(by_module):
        pages = by_module[module]
        # pages are grouped (short ones together) within a module
        texts = []
        for rel, text in pages:
            texts.extend(split_long(text))
        for i, t in enumerate(group_small(texts, MIN_DOC, MAX_DOC)):
            yield Doc('help-' + lang, '%s/%05d' % (module, i), t)


_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


def fortunes(root, pkg, subdir, lang, skip=()):
    base = os.path.join(pkgdir(root, pkg), 'usr/share/games/fortunes', subdir)
    files = []
    for dp, dn, fn in os.walk(base):
        dn[:] = sorted(d for d in dn if d not in skip)
        for f in sorted(fn):
            p = os.path.join(dp, f)
            if f.endswith('.dat') or f.endswith('.u8') or os.path.islink(p) or f in skip:
                continue
            files.append(p)
    if not files:
        sys.exit('build_corpus: no fortune files under %s' % base)
    cap = RepeatCap(limit=1, min_len=20)
    for path in sorted(files):
        text = _ANSI.sub('', read_text(path))
        items = []
        for item in re.split(r'\n%+\n', '\n' + text + '\n'):
            item = clean(item)
            if item.strip() and not mostly_english(item, lang) and cap.allow(item):
                items.append(item)
        name = os.path.relpath(path, base)
        for i, t in enumerate(group_small(items, MIN_DOC, MAX_DOC, '\n%\n')):
            yield Doc('fortunes-' + lang, '%s/%04d' % (name, i), t)


_HEADING = re.compile(r"^[^\n\x02a-zàâçéèêëîïôûùüÿæœ]{2,60}$")
_TRANSLATION = re.compile(r'^(TRADUCTION|TRADUCCIÓN|ÜBERSETZUNG)$')


def man_pages(root, pkg, lang):
    base = os.path.join(pkgdir(root, pkg), 'usr/share/man', lang)
    files = sorted(glob.glob(os.path.join(base, 'man*', '*')))
    cap = RepeatCap(limit=3)
    n = 0
    for path in files:
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        text = roff.render(read_text(path))
        if not text:
            continue
        keep = []
        for para in text.split('\n\n'):
            if _TRANSLATION.match(para.strip()):
                break  # translator credits and the bug-report address follow
            if para.startswith(CODE_MARK):
                keep.append(para[1:])
            elif not mostly_english(para, lang) and cap.allow(para):
                keep.append(para)
        # section headings whose whole section was dropped go too
        keep = [p for i, p in enumerate(keep)
                if not (i and _HEADING.match(p) and (i + 1 == len(keep) or _HEADING.match(keep[i + 1])))]
        body = '\n\n'.join(keep)
        if len(body) < 200:
            continue
        n += 1
        yield from emit('man-' + lang, os.path.relpath(path, base), body)
    if n == 0:
        sys.exit('build_corpus: no man pages under %s' % base)


# ---------------------------------------------------------------- C code --

_COMMENT = re.compile(r'/\*.*?\*/', re.S)
_LICENCE = re.compile(r'copyright|permission|redistribut|licen[cs]e|warrant', re.I)


def _licence_key(block):
    """Normalise a licence comment so that copies differing only in names,
    years and layout compare equal."""
    lines = [l for l in block.split('\n') if not re.search(r'copyright|\(c\)|all rights', l, re.I)]
    s = re.sub(r'[\W\d_]+', ' ', ' '.join(lines).lower())
    return s.strip()


def newlib(root):
    tars = sorted(glob.glob(os.path.join(pkgdir(root, 'newlib-source'), 'usr/src/newlib/*.tar*')))
    if not tars:
        sys.exit('build_corpus: no newlib tarball in newlib-source')
    want = re.compile(r'(?:^|/)newlib/(libc|libm)/.*\.c$')
    skip = re.compile(r'/libc/iconv/ccs/|/libm/test/')
    files = {}
    with tarfile.open(tars[-1]) as tf:
        for m in tf:
            if m.isfile() and want.search(m.name) and not skip.search(m.name):
                files[m.name[m.name.index('newlib/'):]] = tf.extractfile(m).read()
    seen = {}
    items = []
    for name in sorted(files):
        text = read_text(files[name])
        if len(text) > 200_000:
            continue  # generated tables

        def cap_licence(m):
            block = m.group(0)
            if len(block) < 100 or not _LICENCE.search(block):
                return block
            k = _licence_key(block)
            seen[k] = seen.get(k, 0) + 1
            if seen[k] > 2 or len(seen) > 40:
                return ''  # each licence at most twice, at most 40 kinds in all
            return block
        text = _COMMENT.sub(cap_licence, text)
        text = clean(text)
        if len(_COMMENT.sub('', text).strip()) < 40:
            continue  # empty stubs
        if len(text) > 96_000:
            text = split_long(text, 96_000, CODE)[0]
        items.append((os.path.dirname(name), name, text))
    yield from grouped('newlib', items, CODE)


def python_stdlib(root):
    base = pkgdir(root, 'libpython3.11-stdlib')
    libdir = sorted(glob.glob(os.path.join(base, 'usr/lib/python3*')))[-1]
    paths = []
    for dp, dn, fn in os.walk(libdir):
        dn[:] = sorted(d for d in dn if d not in ('pydoc_data', 'lib-dynload', '__pycache__'))
        paths.extend(os.path.join(dp, f) for f in sorted(fn) if f.endswith('.py'))
    if not paths:
        sys.exit('build_corpus: no Python files under %s' % libdir)
    items = []
    for path in paths:
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        text = clean(read_text(path))
        if len(text) > 160_000:
            text = split_long(text, 160_000, CODE)[0]
        rel = os.path.relpath(path, libdir)
        if len(re.sub(r'(?m)^\s*#.*$', '', text).strip()) < 40:
            continue  # package markers and other near-empty files
        items.append((os.path.dirname(rel), rel, text))
    yield from grouped('pystdlib', items, CODE)


def statsmodels_data(root):
    base = os.path.join(pkgdir(root, 'python3-statsmodels'), 'usr/lib/python3/dist-packages')
    paths = []
    for dp, dn, fn in os.walk(base):
        dn.sort()
        paths.extend(os.path.join(dp, f) for f in sorted(fn) if f.endswith(('.csv', '.dat')))
    if not paths:
        sys.exit('build_corpus: no data files in python3-statsmodels')
    seen = set()
    items = []
    lines_only = ((r'\n', '\n'),)
    for path in paths:
        with open(path, 'rb') as f:
            raw = f.read()
        h = hashlib.sha1(raw).digest()
        if h in seen:
            continue  # the same table shipped twice
        seen.add(h)
        text = clean(read_text(raw))
        if max(len(l) for l in text.split('\n')) > 2000:
            continue  # a whole table in a handful of very long lines
        if len(text) > 200_000:
            text = split_long(text, 200_000, lines_only)[0]
        name = os.path.relpath(path, base)
        lines = text.split('\n')
        # pieces of a long table each start with the table's header line
        header = lines[0] if len(lines) > 1 and re.search(r'[A-Za-z]', lines[0]) else None
        if header and len(text) > MAX_DOC:
            body = '\n'.join(lines[1:])
            for p in split_long(body, MAX_DOC - len(header) - 1, lines_only):
                items.append((os.path.dirname(name), name, header + '\n' + p))
        else:
            for p in split_long(text, MAX_DOC, lines_only):
                items.append((os.path.dirname(name), name, p))
    yield from grouped('statsmodels', items, lines_only)


# ------------------------------------------------------------------------ --

def domain_sources(domain, root):
    if domain == 'english':
        return [austen(root), bible(root, 'sword-text-web', 'engWEB2015eb', 'web')]
    if domain == 'german':
        return [help_pages(root, 'de'), fortunes(root, 'fortunes-de', 'de', 'de', skip=('asciiart',))]
    if domain == 'french':
        return [help_pages(root, 'fr'), man_pages(root, 'manpages-fr', 'fr')]
    if domain == 'spanish':
        return [help_pages(root, 'es'), bible(root, 'sword-text-sparv', 'spaRV1909eb', 'rv1909'),
                fortunes(root, 'fortunes-es', 'es', 'es', skip=('off',))]
    if domain == 'c':
        return [newlib(root)]
    if domain == 'python':
        return [python_stdlib(root)]
    if domain == 'numbers':
        return [statsmodels_data(root)]
    raise ValueError(domain)


def order_key(domain, doc):
    return hashlib.sha1(('%s|%s|%s' % (domain, doc.source, doc.key)).encode()).digest()


def build_domain(domain, root, out, small):
    t0 = time.time()
    docs = []
    for gen in domain_sources(domain, root):
        docs.extend(d for d in gen if d.text.strip())
    docs.sort(key=lambda d: order_key(domain, d))
    budget = SMALL_BYTES if small else FULL_CAP_BYTES
    chosen, total = [], 0
    for d in docs:
        b = len(d.text.encode('utf-8')) + len(SEP)
        if total + b > budget and total > 0:
            if small and total >= 0.8 * budget:
                break
            continue
        chosen.append(d)
        total += b
    path = os.path.join(out, domain + '.txt')
    with open(path, 'w', encoding='utf-8', newline='\n') as f:
        f.write(SEP.join(d.text for d in chosen))
        f.write('\n')
    per_source = {}
    for d in chosen:
        per_source[d.source] = per_source.get(d.source, 0) + len(d.text.encode('utf-8'))
    detail = ', '.join('%s %.2f' % (s, b / 1e6) for s, b in sorted(per_source.items()))
    print('  %-8s %6d docs %7.2f MB  (%s) %.1fs' % (domain, len(chosen), os.path.getsize(path) / 1e6,
                                                 detail, time.time() - t0), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    ap.add_argument('--root', required=True, help='directory with unpacked packages')
    ap.add_argument('--out', required=True, help='output directory')
    ap.add_argument('--small', action='store_true', help='about 0.5 MB per domain')
    ap.add_argument('--domains', default=','.join(DOMAINS), help='comma-separated subset')
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for d in a.domains.split(','):
        build_domain(d, a.root, a.out, a.small)


if __name__ == '__main__':
    main()
