"""Read character vectors out of an R lazy-load database (Rdata.rdb/.rdx).

An R package's data/ directory may hold a lazy-load database: Rdata.rdx is a
gzip'd R serialization of a list whose "variables" element maps each object
name to (offset, length) inside Rdata.rdb.  Each blob in the .rdb starts with
a 4-byte big-endian uncompressed length followed by a zlib stream (other
compression kinds put a one-byte tag after the length).  The decompressed
blob is again an R serialization.

Only the XDR ("X\n") format is handled, and only the node types that plain
data sets use: vectors, strings, pairlists, symbols, references and a few
special values.  Anything else raises ValueError.
"""
import bz2
import gzip
import lzma
import struct
import zlib

NILVALUE, GLOBALENV, UNBOUND, MISSINGARG, BASENS = 254, 253, 252, 251, 247
EMPTYENV, BASEENV, REFSXP, PERSISTSXP = 242, 241, 255, 248
NAMESPACESXP, PACKAGESXP, ATTRLISTSXP, ATTRLANGSXP, ALTREP = 249, 250, 239, 240, 238
SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 9, 10, 13, 14, 15, 16
DOTSXP, VECSXP, EXPRSXP, RAWSXP, S4SXP = 17, 19, 20, 24, 25
NA_INT = -(2 ** 31)


class RSymbol(str):
    """A symbol name (distinct from a plain string)."""


class RObject:
    """A decoded R value: .type, .value (a Python list or scalar), .attrs."""

    def __init__(self, rtype, value, attrs=None):
        self.type, self.value, self.attrs = rtype, value, attrs or {}

    def __repr__(self):
        return 'RObject(%d, %r, %r)' % (self.type, self.value, self.attrs)


class _Reader:
    def __init__(self, buf):
        self.b, self.p, self.refs = buf, 0, []

    def take(self, n):
        if self.p + n > len(self.b):
            raise ValueError('R serialization truncated')
        s = self.b[self.p:self.p + n]
        self.p += n
        return s

    def int(self):
        return struct.unpack('>i', self.take(4))[0]

    def length(self):
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self):
        if self.take(2) != b'X\n':
            raise ValueError('only the XDR R serialization format is supported')
        version = self.int()
        self.int()  # writer's R version
        self.int()  # oldest R version that can read it
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError('unknown R serialization version %d' % version)

    def pairlist_attrs(self, node):
        """Turn a decoded pairlist into a dict of tag -> value."""
        out = {}
        for tag, val in node.value if isinstance(node, RObject) else []:
            out[str(tag)] = val
        return out

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        levels = flags >> 12
        if t == NILVALUE:
            return None
        if t in (GLOBALENV, UNBOUND, MISSINGARG, BASENS, EMPTYENV, BASEENV):
            return RObject(t, None)
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t in (PERSISTSXP, NAMESPACESXP, PACKAGESXP):
            if self.int() != 0:
                raise ValueError('unexpected persistent-name header')
            names = [self.item() for _ in range(self.int())]
            obj = RObject(t, names)
            self.refs.append(obj)
            return obj
        if t == SYMSXP:
            name = self.item()
            sym = RSymbol(name if name is not None else '')
            self.refs.append(sym)
            return sym
        if t == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.take(n)
            if levels & (1 << 2):  # LATIN1
                return raw.decode('latin-1')
            return raw.decode('utf-8', errors='replace')
        if t in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP):
            cells = []
            attrs = {}
            while True:
                a = self.item() if has_attr else None
                tag = self.item() if has_tag else None
                car = self.item()
                cells.append((tag, car))
                if a is not None and not attrs:
                    attrs = self.pairlist_attrs(a)
                nflags = self.int()
                nt = nflags & 0xFF
                if nt not in (LISTSXP, LANGSXP, ATTRLISTSXP, ATTRLANGSXP, DOTSXP):
                    self.p -= 4
                    self.item()  # the final CDR (normally NULL)
                    break
                has_attr = bool(nflags & (1 << 9))
                has_tag = bool(nflags & (1 << 10))
            return RObject(LISTSXP, cells, attrs)
        if t == ENVSXP:
            env = RObject(t, None)
            self.refs.append(env)
            self.int()  # locked
            self.item()  # enclosing environment
            frame, hashtab = self.item(), self.item()
            self.item()  # attributes
            env.value = (frame, hashtab)
            return env
        if t in (LGLSXP, INTSXP):
            n = self.length()
            vals = list(struct.unpack('>%di' % n, self.take(4 * n)))
            vals = [None if v == NA_INT else v for v in vals]
        elif t == REALSXP:
            n = self.length()
            vals = list(struct.unpack('>%dd' % n, self.take(8 * n)))
        elif t == CPLXSXP:
            n = self.length()
            f = struct.unpack('>%dd' % (2 * n), self.take(16 * n))
            vals = [complex(f[i], f[i + 1]) for i in range(0, 2 * n, 2)]
        elif t == RAWSXP:
            vals = self.take(self.length())
        elif t in (STRSXP, VECSXP, EXPRSXP):
            vals = [self.item() for _ in range(self.length())]
        elif t == S4SXP:
            vals = None
        elif t == ALTREP:
            info, state, attr = self.item(), self.item(), self.item()
            cls = info.value[0][1] if isinstance(info, RObject) and info.value else ''
            return RObject(ALTREP, (str(cls), state), self.pairlist_attrs(attr))
        else:
            raise ValueError('unsupported R node type %d' % t)
        attrs = self.pairlist_attrs(self.item()) if has_attr else {}
        return RObject(t, vals, attrs)


def unserialize(buf):
    r = _Reader(buf)
    r.header()
    return r.item()


def _blob(rdb, offset, length):
    chunk = rdb[offset:offset + length]
    size = struct.unpack('>I', chunk[:4])[0]
    body = chunk[4:]
    if body[:1] == b'Z':
        data = zlib.decompress(body[1:])
    elif body[:1] == b'2':
        data = bz2.decompress(body[1:])
    elif body[:1] == b'X':
        data = lzma.decompress(body[1:])
    elif body[:1] == b'0':
        data = body[1:]
    else:
        data = zlib.decompress(body)
    if len(data) != size:
        raise ValueError('lazy-load blob has %d bytes, header says %d' % (len(data), size))
    return data


def load_database(prefix):
    """Return {name: RObject} for every variable in PREFIX.rdx/PREFIX.rdb."""
    with open(prefix + '.rdx', 'rb') as f:
        raw = f.read()
    idx = unserialize(gzip.decompress(raw) if raw[:2] == b'\x1f\x8b' else zlib.decompress(raw[4:]))
    names = idx.attrs['names'].value
    variables = idx.value[names.index('variables')]
    with open(prefix + '.rdb', 'rb') as f:
        rdb = f.read()
    out = {}
    for name, pos in zip(variables.attrs['names'].value, variables.value):
        offset, length = pos.value
        out[name] = unserialize(_blob(rdb, offset, length))
    return out


def character_vectors(prefix):
    """Return {name: [str, ...]} for the character-vector objects in a database."""
    return {k: v.value for k, v in load_database(prefix).items()
            if isinstance(v, RObject) and v.type == STRSXP}
