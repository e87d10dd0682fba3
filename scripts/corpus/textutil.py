"""Text helpers shared by the corpus builders: cleaning, splitting long
documents, grouping short ones, a stop-word language check and a cap on
repeated boilerplate paragraphs."""
import re
import unicodedata

MAX_DOC = 16000   # split documents longer than this (characters)
MIN_DOC = 1200    # group short documents until they reach this

_CTRL = re.compile(r'[\x00-\x08\x0b-\x1f\x7f]')  # keeps \t and \n; drops \f, \r, ESC


def clean(text):
    """Normalise newlines, drop control characters (including form feeds,
    which separate documents in the output), strip trailing blanks and
    squeeze runs of blank lines."""
    text = text.replace('\r\n', '\n').replace('\r', '\n')
    text = _CTRL.sub('', text)
    text = '\n'.join(l.rstrip() for l in text.split('\n'))
    text = re.sub(r'\n{3,}', '\n\n', text)
    return text.strip('\n')


PROSE = ((r'\n\n', '\n\n'), (r'\n', '\n'))
CODE = ((r'\n\n(?=\S)', '\n\n'), (r'\n\n', '\n\n'), (r'\n', '\n'))


def split_long(text, limit=MAX_DOC, levels=PROSE):
    """Split TEXT into pieces of at most about LIMIT characters.  LEVELS is a
    list of (regex, joiner) pairs tried in turn: the text is cut where the
    first regex matches, pieces still too long are cut by the next one, and
    neighbouring pieces are packed back together (with the joiner) up to
    LIMIT.  Past the last level, text is cut every LIMIT characters."""
    if len(text) <= limit:
        return [text]
    if not levels:
        return [text[i:i + limit] for i in range(0, len(text), limit)]
    rx, sep = levels[0]
    units = []
    for u in re.split(rx, text):
        if not u.strip():
            continue
        units.extend(split_long(u, limit, levels[1:]) if len(u) > limit else [u])
    pieces, cur, size = [], [], 0
    for u in units:
        if cur and size + len(u) > limit:
            pieces.append(sep.join(cur))
            cur, size = [], 0
        cur.append(u)
        size += len(u) + len(sep)
    if cur:
        pieces.append(sep.join(cur))
    return [p.strip('\n') for p in pieces if p.strip()]


def group_small(texts, minimum=MIN_DOC, limit=MAX_DOC, sep='\n\n'):
    """Join consecutive short texts so that each group reaches MINIMUM
    characters without going past LIMIT."""
    out, cur, size = [], [], 0
    for t in texts:
        if cur and size + len(t) > limit:
            out.append(sep.join(cur))
            cur, size = [], 0
        cur.append(t)
        size += len(t) + len(sep)
        if size >= minimum:
            out.append(sep.join(cur))
            cur, size = [], 0
    if cur:
        if out and len(out[-1]) + size <= limit:
            out[-1] = out[-1] + sep + sep.join(cur)
        else:
            out.append(sep.join(cur))
    return out


# Common words.  Words that are also common in the other language of a pair
# (English "in"/German "in", English "on"/French "on", ...) are left out.
STOP = {
    'en': set('''the of and to is that for with this are be it by you from or can
        which will not your when was have these there into only must should would
        been their they than more such each other any its at what how does do used
        using following select click enter shows specifies'''.split()),
    'de': set('''der die das und ist nicht mit den von zu sie ein eine einer einen
        auf für dem des sich wird werden oder auch im bei wenn kann können wie aus
        diese dieser dieses als nur sind hat nach über zum zur wählen klicken wo
        einem durch dass daß wir ich'''.split()),
    'fr': set('''le la les de des du un une et est pour dans que qui sur pas par avec
        ce cette ces sont vous il elle au aux ou être peut plus se son sa ses
        mais lorsque leur nous je cliquez sélectionnez'''.split()),
    'es': set('''el la los las de del y que en un una es por para con se al lo su sus
        como más pero este esta estos estas puede son está haga seleccione
        cuando desde sobre entre ya muy fue'''.split()),
}

_WORD = re.compile(r"[^\W\d_]+")


def stop_counts(text, lang):
    words = [w.lower() for w in _WORD.findall(text)]
    return (sum(1 for w in words if w in STOP[lang]),
            sum(1 for w in words if w in STOP['en']))


def mostly_english(text, lang):
    """True when English common words outnumber LANG's in TEXT."""
    own, en = stop_counts(text, lang)
    return en > own


def _norm(p):
    p = unicodedata.normalize('NFKC', p).lower()
    p = re.sub(r'\d+', '0', p)
    return re.sub(r'\s+', ' ', p).strip()


class RepeatCap:
    """Counts paragraphs across a domain and lets each distinct long one
    through at most LIMIT times (boilerplate such as navigation text, licence
    blocks or translator credits)."""

    def __init__(self, limit=3, min_len=40):
        self.limit, self.min_len, self.seen = limit, min_len, {}

    def allow(self, paragraph):
        if len(paragraph) < self.min_len:
            return True
        k = _norm(paragraph)
        n = self.seen.get(k, 0)
        self.seen[k] = n + 1
        return n < self.limit

    def filter(self, text, sep='\n\n'):
        return sep.join(p for p in text.split(sep) if self.allow(p))
