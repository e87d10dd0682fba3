/* data/pretok.c: pre-tokenisers (see pretok.h).
 *
 * Our own cutter (tokenizer_pretok_next) follows GPT-2's pattern
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * over raw bytes with approximate classes: ASCII is classified exactly; a
 * valid multi-byte UTF-8 character is a letter unless a small range table
 * (unicode_ranges below) says it is whitespace, a number or "other". Bytes
 * that are not valid UTF-8 (and control characters) are single "other"
 * characters. Trained vocabularies depend on these cuts: keep them as they are.
 *
 * The cutters of published vocabularies reproduce llama.cpp's results, which
 * come from two kinds of code there: hand-written matchers for the GPT-2,
 * Llama-3 and Qwen-2 patterns (mirrored by split_gpt2 and split_llama3), and
 * std::regex (ECMAScript, leftmost match, alternatives in order, greedy with
 * backtracking) for the others, run over a copy of the text where every
 * non-ASCII code point is replaced by one byte naming its class (so \p{L}
 * means "that byte or A-Za-z") or, for patterns without \p{..}, over the code
 * points with non-ASCII white space replaced by U+000B. The quirks that come
 * with that are kept on purpose, for example: in the collapsed patterns ASCII
 * '~' is neither \p{P} nor \p{S}, \s is the six ASCII white-space characters
 * plus any White_Space code point, and pieces nothing matches stay pieces of
 * their own. Each std::regex pattern is written out below as a small matcher
 * of its own (the patterns are fixed, so no regex engine is needed). */
#include <stdint.h>
#include <string.h>

#include "core/core.h"
#include "data/pretok.h"

/* ---- our own cutter ---------------------------------------------------------- */
enum { CL_LETTER = 0, CL_NUMBER = 1, CL_SPACE = 2, CL_OTHER = 3 };

/* Non-letter ranges among multi-byte characters; everything else that is
 * valid UTF-8 counts as a letter. Sorted, non-overlapping. */
static const struct { uint32_t lo, hi; uint8_t cls; } unicode_ranges[] = {
    {0x0080, 0x0084, CL_OTHER},   {0x0085, 0x0085, CL_SPACE},   {0x0086, 0x009F, CL_OTHER},
    {0x00A0, 0x00A0, CL_SPACE},   {0x00A1, 0x00A9, CL_OTHER},   {0x00AB, 0x00B1, CL_OTHER},
    {0x00B2, 0x00B3, CL_NUMBER},  {0x00B4, 0x00B4, CL_OTHER},   {0x00B6, 0x00B8, CL_OTHER},
    {0x00B9, 0x00B9, CL_NUMBER},  {0x00BB, 0x00BB, CL_OTHER},   {0x00BC, 0x00BE, CL_NUMBER},
    {0x00BF, 0x00BF, CL_OTHER},   {0x00D7, 0x00D7, CL_OTHER},   {0x00F7, 0x00F7, CL_OTHER},
    {0x02C2, 0x02C5, CL_OTHER},   {0x02D2, 0x02DF, CL_OTHER},   {0x02E5, 0x02EB, CL_OTHER},
    {0x02ED, 0x02ED, CL_OTHER},   {0x02EF, 0x036F, CL_OTHER},   {0x037E, 0x037E, CL_OTHER},
    {0x0384, 0x0385, CL_OTHER},   {0x0387, 0x0387, CL_OTHER},   {0x0483, 0x0489, CL_OTHER},
    {0x0660, 0x0669, CL_NUMBER},  {0x06F0, 0x06F9, CL_NUMBER},  {0x0966, 0x096F, CL_NUMBER},
    {0x1680, 0x1680, CL_SPACE},   {0x2000, 0x200A, CL_SPACE},   {0x200B, 0x2027, CL_OTHER},
    {0x2028, 0x2029, CL_SPACE},   {0x202A, 0x202E, CL_OTHER},   {0x202F, 0x202F, CL_SPACE},
    {0x2030, 0x205E, CL_OTHER},   {0x205F, 0x205F, CL_SPACE},   {0x2060, 0x206F, CL_OTHER},
    {0x2070, 0x2070, CL_NUMBER},  {0x2074, 0x2079, CL_NUMBER},  {0x207A, 0x207E, CL_OTHER},
    {0x2080, 0x2089, CL_NUMBER},  {0x208A, 0x208E, CL_OTHER},   {0x20A0, 0x20FF, CL_OTHER},
    {0x2100, 0x2101, CL_OTHER},   {0x2103, 0x2106, CL_OTHER},   {0x2108, 0x2109, CL_OTHER},
    {0x2114, 0x2114, CL_OTHER},   {0x2116, 0x2118, CL_OTHER},   {0x211E, 0x2123, CL_OTHER},
    {0x2125, 0x2125, CL_OTHER},   {0x2127, 0x2127, CL_OTHER},   {0x2129, 0x2129, CL_OTHER},
    {0x212E, 0x212E, CL_OTHER},   {0x213A, 0x213B, CL_OTHER},   {0x2140, 0x2144, CL_OTHER},
    {0x214A, 0x214D, CL_OTHER},   {0x214F, 0x214F, CL_OTHER},   {0x2150, 0x2182, CL_NUMBER},  {0x2185, 0x2189, CL_NUMBER},  {0x218A, 0x218B, CL_OTHER},
    {0x2190, 0x245F, CL_OTHER},   {0x2460, 0x249B, CL_NUMBER},  {0x249C, 0x24E9, CL_OTHER},
    {0x24EA, 0x24FF, CL_NUMBER},  {0x2500, 0x2775, CL_OTHER},   {0x2776, 0x2793, CL_NUMBER},
    {0x2794, 0x2BFF, CL_OTHER},   {0x2E00, 0x2E7F, CL_OTHER},   {0x3000, 0x3000, CL_SPACE},
    {0x3001, 0x3004, CL_OTHER},   {0x3007, 0x3007, CL_NUMBER},  {0x3008, 0x3020, CL_OTHER},
    {0x3021, 0x3029, CL_NUMBER},  {0x302A, 0x3030, CL_OTHER},   {0x3036, 0x3037, CL_OTHER},
    {0x3038, 0x303A, CL_NUMBER},  {0x303D, 0x303F, CL_OTHER},   {0x3099, 0x309C, CL_OTHER},
    {0x30A0, 0x30A0, CL_OTHER},   {0x30FB, 0x30FB, CL_OTHER},   {0xE000, 0xF8FF, CL_OTHER},
    {0xFD3E, 0xFD3F, CL_OTHER},   {0xFE00, 0xFE19, CL_OTHER},   {0xFE20, 0xFE6F, CL_OTHER},
    {0xFEFF, 0xFEFF, CL_OTHER},   {0xFF01, 0xFF0F, CL_OTHER},   {0xFF10, 0xFF19, CL_NUMBER},
    {0xFF1A, 0xFF20, CL_OTHER},   {0xFF3B, 0xFF40, CL_OTHER},   {0xFF5B, 0xFF65, CL_OTHER},
    {0xFFE0, 0xFFEE, CL_OTHER},   {0xFFF0, 0xFFFF, CL_OTHER},   {0x1F000, 0x1FBFF, CL_OTHER},
    {0xE0000, 0xE007F, CL_OTHER}, {0xE0100, 0xE01EF, CL_OTHER}, {0xF0000, 0x10FFFF, CL_OTHER},
};

static int unicode_class(uint32_t cp) {
    size_t lo = 0, hi = sizeof(unicode_ranges) / sizeof(unicode_ranges[0]);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < unicode_ranges[mid].lo) hi = mid;
        else if (cp > unicode_ranges[mid].hi) lo = mid + 1;
        else return unicode_ranges[mid].cls;
    }
    return CL_LETTER;
}

size_t utf8_seq(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF) {
        if (n < 2 || (s[1] & 0xC0) != 0x80) return 0;
        *cp = ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
        return 2;
    }
    if (c >= 0xE0 && c <= 0xEF) {
        if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && s[1] < 0xA0) return 0; /* overlong */
        if (c == 0xED && s[1] > 0x9F) return 0; /* surrogate */
        *cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        if (c == 0xF0 && s[1] < 0x90) return 0; /* overlong */
        if (c == 0xF4 && s[1] > 0x8F) return 0; /* > U+10FFFF */
        *cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
              ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
        return 4;
    }
    return 0;
}

static inline int ascii_class(unsigned c) {
    if ((unsigned)((c | 32) - 'a') < 26) return CL_LETTER;
    if ((unsigned)(c - '0') < 10) return CL_NUMBER;
    if (c == ' ' || (c >= 9 && c <= 13)) return CL_SPACE;
    return CL_OTHER;
}

/* Class of the character at s[i]; its byte length in *clen. */
static inline int char_at(const unsigned char *s, size_t n, size_t i, size_t *clen) {
    unsigned c = s[i];
    if (c < 0x80) {
        *clen = 1;
        return ascii_class(c);
    }
    uint32_t cp;
    size_t l = utf8_seq(s + i, n - i, &cp);
    if (!l) {
        *clen = 1;
        return CL_OTHER;
    }
    *clen = l;
    return unicode_class(cp);
}

/* End (exclusive) of the piece starting at i < n (pretok.h). */
size_t tokenizer_pretok_next(const char *text, size_t n, size_t i) {
    const unsigned char *s = (const unsigned char *)text;
    unsigned c = s[i];
    if (c == '\'' && i + 1 < n) { /* 's 't 're 've 'm 'll 'd */
        unsigned c1 = s[i + 1];
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
        if (i + 2 < n) {
            unsigned c2 = s[i + 2];
            if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))
                return i + 3;
        }
    }
    size_t cl, p;
    int k = char_at(s, n, i, &cl);
    if (k == CL_SPACE) {
        if (c == ' ' && i + 1 < n) { /* " ?X+" with X letter, number or other */
            size_t cl2;
            int k2 = char_at(s, n, i + 1, &cl2);
            if (k2 != CL_SPACE) {
                k = k2;
                p = i + 1 + cl2;
                goto run;
            }
        }
        /* \s+(?!\S) | \s+ : a whitespace run; when something follows it, its
         * last character is left to start the next piece (unless the run is a
         * single character). */
        size_t last = i;
        p = i + cl;
        while (p < n) {
            size_t l;
            if (char_at(s, n, p, &l) != CL_SPACE) break;
            last = p;
            p += l;
        }
        if (p < n && last > i) return last;
        return p;
    }
    p = i + cl;
run:
    while (p < n) {
        size_t l;
        if (char_at(s, n, p, &l) != k) break;
        p += l;
    }
    return p;
}

/* ---- Unicode classes ------------------------------------------------------------ */
unsigned unicode_class_bits(uint32_t cp) {
    if (cp >= 0x110000) return UCAT_UNASSIGNED;
    size_t lo = 0, hi = unicode_tab_n; /* last entry starting at or before cp */
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if ((unicode_tab[mid] >> 8) <= cp) lo = mid;
        else hi = mid;
    }
    unsigned bits = unicode_tab[lo] & 0xff;
    for (size_t i = 0; i < unicode_space_n && unicode_space[i] <= cp; i++)
        if (unicode_space[i] == cp) bits |= UCAT_SPACE;
    return bits;
}

size_t pretok_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    if (!(c & 0x80)) {
        *cp = c;
        return 1;
    }
    if (c & 0x40) {
        if (!(c & 0x20)) {
            if (n >= 2 && (s[1] & 0xC0) == 0x80) {
                *cp = ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
                return 2;
            }
        } else if (!(c & 0x10)) {
            if (n >= 3 && (s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80) {
                *cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
                return 3;
            }
        } else if (!(c & 0x08)) {
            if (n >= 4 && (s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 && (s[3] & 0xC0) == 0x80) {
                *cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
                      ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
                return 4;
            }
        }
    }
    *cp = 0xFFFD;
    return 1;
}

/* UTF-8 of cp into d (room for 4); U+FFFD for what UTF-8 cannot hold. */
size_t pretok_encode(uint32_t cp, unsigned char *d) {
    if (cp < 0x80) {
        d[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        d[0] = (unsigned char)(0xC0 | (cp >> 6));
        d[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp > 0x10FFFF) cp = 0xFFFD;
    if (cp < 0x10000) {
        d[0] = (unsigned char)(0xE0 | (cp >> 12));
        d[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        d[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    d[0] = (unsigned char)(0xF0 | (cp >> 18));
    d[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    d[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    d[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---- published vocabularies' cutters ---------------------------------------------- */
/* Classes as the collapsed std::regex patterns see them (bit per class). */
enum { RX_L = 1, RX_N = 2, RX_P = 4, RX_S = 8, RX_M = 16, RX_WS = 32 };

typedef struct {
    const uint32_t *cp;
    const uint16_t *fl; /* unicode_class_bits */
    const uint8_t *rx;  /* RX_* */
} ptext;

typedef struct {
    size_t *v;
    size_t n, cap;
} seglist;

static moe_status seg_push(seglist *l, size_t len) {
    if (!len) return MOE_OK;
    if (l->n == l->cap) {
        size_t c = l->cap ? 2 * l->cap : 64;
        size_t *v = moe_realloc(l->v, c * sizeof(size_t));
        if (!v) return MOE_ERR_NOMEM;
        l->v = v;
        l->cap = c;
    }
    l->v[l->n++] = len;
    return MOE_OK;
}

static uint8_t rx_class(uint32_t c, unsigned fl) {
    if (c < 128) {
        if ((unsigned)((c | 32) - 'a') < 26) return RX_L;
        if ((unsigned)(c - '0') < 10) return RX_N;
        if (c == ' ' || (c >= 9 && c <= 13)) return RX_WS;
        if (c && strchr("!\"#%&'()*,-./:;?@[\\]_{}", (int)c)) return RX_P;
        if (c && strchr("$+<=>^`|", (int)c)) return RX_S;
        return 0; /* controls, '~' */
    }
    if (fl & UCAT_SPACE) return RX_WS;
    if (fl & UCAT_LETTER) return RX_L;
    if (fl & UCAT_NUMBER) return RX_N;
    if (fl & UCAT_PUNCTUATION) return RX_P;
    if (fl & UCAT_SYMBOL) return RX_S;
    if (fl & UCAT_MARK) return RX_M;
    return 0;
}

/* The code point a pattern without \p{..} sees: non-ASCII white space is U+000B. */
static inline uint32_t wide_cp(const ptext *t, size_t i) {
    return (t->rx[i] & RX_WS) && t->cp[i] >= 0x80 ? 0x0B : t->cp[i];
}

typedef struct {
    uint32_t lo, hi;
} cp_range;

static int in_ranges(const cp_range *r, size_t n, uint32_t c) {
    for (size_t i = 0; i < n; i++)
        if (c >= r[i].lo && c <= r[i].hi) return 1;
    return 0;
}

/* DeepSeek-LLM's explicit letter class (the cased scripts), from its pattern. */
static const cp_range ds_letters[] = {
    {0x41, 0x5A}, {0x61, 0x7A}, {0xB5, 0xB5}, {0xC0, 0xD6}, {0xD8, 0xF6}, {0xF8, 0x1BA},
    {0x1BC, 0x1BF}, {0x1C4, 0x293}, {0x295, 0x2AF}, {0x370, 0x373}, {0x376, 0x377},
    {0x37B, 0x37D}, {0x37F, 0x37F}, {0x386, 0x386}, {0x388, 0x38A}, {0x38C, 0x38C},
    {0x38E, 0x3A1}, {0x3A3, 0x3F5}, {0x3F7, 0x481}, {0x48A, 0x52F}, {0x531, 0x556},
    {0x10A0, 0x10C5}, {0x13A0, 0x13F5}, {0x13F8, 0x13FD}, {0x1C90, 0x1CBA}, {0x1CBD, 0x1CBF},
    {0x1D00, 0x1D2B}, {0x1D6B, 0x1D77}, {0x1D79, 0x1D9A}, {0x1E00, 0x1F15}, {0x1F18, 0x1F1D},
    {0x1F20, 0x1F45}, {0x1F48, 0x1F4D}, {0x1F50, 0x1F57}, {0x1F59, 0x1F59}, {0x1F5B, 0x1F5B},
    {0x1F5D, 0x1F5D}, {0x1F5F, 0x1F7D}, {0x1F80, 0x1FB4}, {0x1FB6, 0x1FBC}, {0x1FBE, 0x1FBE},
    {0x1FC2, 0x1FC4}, {0x1FC6, 0x1FCC}, {0x1FD0, 0x1FD3}, {0x1FD6, 0x1FDB}, {0x1FE0, 0x1FEC},
    {0x1FF2, 0x1FF4}, {0x1FF6, 0x1FFC}, {0x2102, 0x2102}, {0x2107, 0x2107}, {0x210A, 0x2113},
    {0x2115, 0x2115}, {0x2119, 0x211D}, {0x2124, 0x2124}, {0x2126, 0x2126}, {0x2128, 0x2128},
    {0x212A, 0x212D}, {0x212F, 0x2134}, {0x2139, 0x2139}, {0x213C, 0x213F}, {0x2145, 0x2149},
    {0x214E, 0x214E}, {0x2183, 0x2184}, {0x2C00, 0x2C7B}, {0x2C7E, 0x2CE4}, {0x2CEB, 0x2CEE},
    {0x2CF2, 0x2CF3}, {0xA640, 0xA66D}, {0xA680, 0xA69B}, {0xA722, 0xA76F}, {0xA771, 0xA787},
    {0xA78B, 0xA78E}, {0xAB70, 0xABBF}, {0xFB00, 0xFB06}, {0xFB13, 0xFB17}, {0xFF21, 0xFF3A},
    {0xFF41, 0xFF5A}, {0x10400, 0x1044F}, {0x104B0, 0x104D3}, {0x104D8, 0x104FB},
    {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x118A0, 0x118DF}, {0x1E900, 0x1E943},
};
/* DeepSeek-LLM's punctuation class: ASCII !-/ and :-~ (letters included),
 * fullwidth forms, curly quotes, U+3000-U+3002. */
static const cp_range ds_punct[] = {{0x21, 0x2F},     {0x3A, 0x7E},     {0xFF01, 0xFF0F},
                                    {0xFF1A, 0xFF5E}, {0x2018, 0x201F}, {0x3000, 0x3002}};
/* DeepSeek-LLM / -Coder's CJK class (U+0800-U+4E00 is one range there). */
static const cp_range ds_cjk[] = {{0x4E00, 0x9FA5}, {0x0800, 0x4E00}, {0xAC00, 0xD7FF}};
/* DeepSeek-V3's CJK class: ideographs, hiragana, katakana. */
static const cp_range ds3_cjk[] = {{0x4E00, 0x9FA5}, {0x3040, 0x309F}, {0x30A0, 0x30FF}};
#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

static int p_crlf(const ptext *t, size_t i) { return t->cp[i] == '\r' || t->cp[i] == '\n'; }
static int p_ds_letter(const ptext *t, size_t i) {
    return in_ranges(ds_letters, N_OF(ds_letters), wide_cp(t, i));
}
static int p_ds_punct(const ptext *t, size_t i) {
    return in_ranges(ds_punct, N_OF(ds_punct), wide_cp(t, i));
}
static int p_ds_cjk(const ptext *t, size_t i) { return in_ranges(ds_cjk, N_OF(ds_cjk), wide_cp(t, i)); }
static int p_ds3_cjk(const ptext *t, size_t i) {
    return in_ranges(ds3_cjk, N_OF(ds3_cjk), wide_cp(t, i));
}
static int p_number(const ptext *t, size_t i) { return t->rx[i] & RX_N; }
static int p_letter(const ptext *t, size_t i) { return t->rx[i] & RX_L; }
static int p_punct(const ptext *t, size_t i) { return t->rx[i] & RX_P; }
static int p_ascii_digit(const ptext *t, size_t i) { return t->cp[i] - '0' < 10u; }
/* the default pre's [\p{P}\$\+<=>\^~\|] */
static int p_default_punct(const ptext *t, size_t i) {
    uint32_t c = t->cp[i];
    return (t->rx[i] & RX_P) || (c && c < 128 && strchr("$+<=>^~|", (int)c));
}

typedef enum { ST_RUN, ST_WS_RUN, ST_TRAIL_WS, ST_GPT2, ST_LLAMA3, ST_DS3 } stage_op;
typedef struct {
    stage_op op;
    int (*pred)(const ptext *, size_t);
    size_t min, max;   /* ST_RUN: [C]{min,max}; ST_LLAMA3: max = digits per group */
    int marks;         /* ST_LLAMA3: marks join letters (qwen35) */
} stage;
#define RUN_ANY ((size_t)-1)

/* Match of one fixed pattern at p in [p, b), or p when there is none. */
static size_t match_at(const stage *st, const ptext *t, size_t p, size_t b) {
    size_t e = p;
    if (st->op == ST_RUN) { /* [C]{min,max} */
        while (e < b && e - p < st->max && st->pred(t, e)) e++;
        return e - p >= st->min ? e : p;
    }
    if (st->op == ST_WS_RUN) { /* \s?[C]+ */
        if ((t->rx[p] & RX_WS) && p + 1 < b && st->pred(t, p + 1)) e = p + 1;
        else if (!st->pred(t, p)) return p;
        while (e < b && st->pred(t, e)) e++;
        return e;
    }
    /* ST_DS3: [punct][A-Za-z]+ | [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+ |
     * ' '?[\p{P}\p{S}]+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+ */
    const uint32_t *c = t->cp;
    const uint8_t *rx = t->rx;
    if (c[p] < 128 && c[p] && strchr("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", (int)c[p]) &&
        p + 1 < b && c[p + 1] < 128 && (rx[p + 1] & RX_L)) {
        e = p + 1;
        while (e < b && c[e] < 128 && (rx[e] & RX_L)) e++;
        return e;
    }
    int prefix_ok = !(c[p] == '\r' || c[p] == '\n' || (rx[p] & (RX_L | RX_P | RX_S)));
    if ((prefix_ok && p + 1 < b && (rx[p + 1] & (RX_L | RX_M))) || (rx[p] & (RX_L | RX_M))) {
        e = p + 1;
        while (e < b && (rx[e] & (RX_L | RX_M))) e++;
        return e;
    }
    size_t q = c[p] == ' ' && p + 1 < b && (rx[p + 1] & (RX_P | RX_S)) ? p + 1 : p;
    if (rx[q] & (RX_P | RX_S)) {
        e = q;
        while (e < b && (rx[e] & (RX_P | RX_S))) e++;
        while (e < b && (c[e] == '\r' || c[e] == '\n')) e++;
        return e;
    }
    if (!(rx[p] & RX_WS)) return p;
    size_t last_nl = 0; /* index + 1 of the last CR/LF in the run */
    while (e < b && (rx[e] & RX_WS)) {
        if (c[e] == '\r' || c[e] == '\n') last_nl = e + 1;
        e++;
    }
    if (last_nl) return last_nl;
    if (e == b || e - p == 1) return e;
    return e - 1;
}

/* What std::regex_iterator leaves: matches, and the stretches between them. */
static moe_status split_matches(const stage *st, const ptext *t, size_t a, size_t b,
                                seglist *out) {
    size_t gap = a, p = a;
    moe_status s;
    while (p < b) {
        size_t e = match_at(st, t, p, b);
        if (e == p) {
            p++;
            continue;
        }
        if ((s = seg_push(out, p - gap)) || (s = seg_push(out, e - p))) return s;
        gap = p = e;
    }
    return seg_push(out, b - gap);
}

/* \s+$ : the white space that ends the piece. */
static moe_status split_trailing_ws(const ptext *t, size_t a, size_t b, seglist *out) {
    size_t s0 = b;
    while (s0 > a && (t->rx[s0 - 1] & RX_WS)) s0--;
    moe_status s = seg_push(out, s0 - a);
    return s ? s : seg_push(out, b - s0);
}

/* Class bits at i, none outside the piece [a, b) (as llama.cpp's matchers). */
#define FL(i) ((i) >= a && (i) < b ? t->fl[i] : 0u)
#define CP(i) ((i) >= a && (i) < b ? t->cp[i] : 0xFFFFFFFFu)

/* GPT-2's pattern as llama.cpp's hand-written matcher applies it. */
static moe_status split_gpt2(const ptext *t, size_t a, size_t b, seglist *out) {
    size_t pos = a, prev = a;
    moe_status s = MOE_OK;
#define CUT(e) do { if ((s = seg_push(out, (e) - prev))) return s; prev = (e); } while (0)
    while (pos < b) {
        uint32_t c = t->cp[pos];
        unsigned f = t->fl[pos];
        if (c == '\'' && pos + 1 < b) { /* 's 't 'm 'd 're 've 'll */
            uint32_t c1 = t->cp[pos + 1];
            if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
                pos += 2;
                CUT(pos);
                continue;
            }
            if (pos + 2 < b) {
                uint32_t c2 = t->cp[pos + 2];
                if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
                    pos += 3;
                    CUT(pos);
                    continue;
                }
            }
        }
        unsigned f2 = c == ' ' ? FL(pos + 1) : f;
        unsigned run = f2 & UCAT_LETTER ? UCAT_LETTER : f2 & UCAT_NUMBER ? UCAT_NUMBER : 0;
        if (run) { /* ' '?\p{L}+ and ' '?\p{N}+ */
            pos += c == ' ';
            while (f2 & run) { pos++; f2 = FL(pos); }
            CUT(pos);
            continue;
        }
        const unsigned not_other = UCAT_SPACE | UCAT_LETTER | UCAT_NUMBER;
        if (!(f2 & not_other) && f2) { /* ' '?[^\s\p{L}\p{N}]+ */
            pos += c == ' ';
            while (!(f2 & not_other) && f2) { pos++; f2 = FL(pos); }
            CUT(pos);
            continue;
        }
        size_t nws = 0;
        while (FL(pos + nws) & UCAT_SPACE) nws++;
        if (nws > 1 && pos + nws < b) { /* \s+(?!\S): the last one starts the next piece */
            pos += nws - 1;
            CUT(pos);
            continue;
        }
        pos += nws ? nws : 1;
        CUT(pos);
    }
    return MOE_OK;
}

/* Llama-3's pattern (digits in groups of up to 3) as llama.cpp's matcher
 * applies it; with digits_per_group 1 it is Qwen-2's, and with marks also
 * Qwen-3.5's (combining marks join letter runs). */
static moe_status split_llama3(const ptext *t, size_t a, size_t b, seglist *out,
                               size_t digits_per_group, int marks) {
    const unsigned word = UCAT_LETTER | (marks ? UCAT_MARK : 0);
    const unsigned not_other = UCAT_SPACE | UCAT_NUMBER | word;
    size_t pos = a, prev = a;
    moe_status s = MOE_OK;
    while (pos < b) {
        uint32_t c = t->cp[pos];
        unsigned f = t->fl[pos];
        if (c == '\'' && pos + 1 < b) { /* the contractions, any case */
            uint32_t c1 = CP(pos + 1) | 0x20;
            if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
                pos += 2;
                CUT(pos);
                continue;
            }
            if (pos + 2 < b) {
                uint32_t c2 = CP(pos + 2) | 0x20;
                if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
                    pos += 3;
                    CUT(pos);
                    continue;
                }
            }
        }
        /* [^\r\n\p{L}\p{N}]?\p{L}+ */
        if (!(c == '\r' || c == '\n' || (f & UCAT_NUMBER)) && ((f & word) || (FL(pos + 1) & word))) {
            pos++;
            while (FL(pos) & word) pos++;
            CUT(pos);
            continue;
        }
        if (f & UCAT_NUMBER) { /* \p{N}{1,k} */
            size_t ini = pos;
            while (FL(pos) & UCAT_NUMBER) {
                if (++pos - ini >= digits_per_group) {
                    CUT(pos);
                    ini = pos;
                }
            }
            CUT(pos);
            continue;
        }
        unsigned f2 = c == ' ' ? FL(pos + 1) : f;
        if (!(f2 & not_other) && f) { /* ' '?[^\s\p{L}\p{N}]+[\r\n]* */
            pos += c == ' ';
            while (!(f2 & not_other) && f2) { pos++; f2 = FL(pos); }
            while (CP(pos) == '\r' || CP(pos) == '\n') pos++;
            CUT(pos);
            continue;
        }
        size_t nws = 0, last_nl = 0;
        while (FL(pos + nws) & UCAT_SPACE) {
            uint32_t cw = t->cp[pos + nws];
            if (cw == '\r' || cw == '\n') last_nl = pos + nws + 1;
            nws++;
        }
        if (last_nl) { /* \s*[\r\n]+ */
            pos = last_nl;
            CUT(pos);
            continue;
        }
        if (nws > 1 && pos + nws < b) { /* \s+(?!\S) */
            pos += nws - 1;
            CUT(pos);
            continue;
        }
        pos += nws ? nws : 1;
        CUT(pos);
    }
#undef CUT
    return MOE_OK;
}
#undef FL
#undef CP

static const stage st_default[] = {{ST_RUN, p_default_punct, 1, RUN_ANY, 0},
                                   {ST_GPT2, NULL, 0, 0, 0},
                                   {ST_RUN, p_number, 1, RUN_ANY, 0},
                                   {ST_RUN, p_ascii_digit, 3, 3, 0}};
static const stage st_gpt2[] = {{ST_GPT2, NULL, 0, 0, 0}};
static const stage st_llama3[] = {{ST_LLAMA3, NULL, 0, 3, 0}};
static const stage st_qwen2[] = {{ST_LLAMA3, NULL, 0, 1, 0}};
static const stage st_qwen35[] = {{ST_LLAMA3, NULL, 0, 1, 1}};
static const stage st_starcoder[] = {{ST_RUN, p_number, 1, 1, 0}, {ST_GPT2, NULL, 0, 0, 0}};
static const stage st_deepseek_llm[] = {
    {ST_RUN, p_crlf, 1, 1, 0},      {ST_WS_RUN, p_ds_letter, 0, 0, 0},
    {ST_WS_RUN, p_ds_punct, 0, 0, 0}, {ST_TRAIL_WS, NULL, 0, 0, 0},
    {ST_RUN, p_ds_cjk, 1, RUN_ANY, 0}, {ST_RUN, p_number, 1, RUN_ANY, 0}};
static const stage st_deepseek_coder[] = {
    {ST_RUN, p_crlf, 1, 1, 0},        {ST_WS_RUN, p_letter, 0, 0, 0},
    {ST_WS_RUN, p_punct, 0, 0, 0},    {ST_RUN, p_ds_cjk, 1, RUN_ANY, 0},
    {ST_RUN, p_number, 1, 1, 0}};
static const stage st_deepseek3[] = {{ST_RUN, p_number, 1, 3, 0},
                                     {ST_RUN, p_ds3_cjk, 1, RUN_ANY, 0},
                                     {ST_DS3, NULL, 0, 0, 0}};

static const stage *stages_of(pretok_kind k, size_t *n) {
#define STAGES(a) (*n = N_OF(a), a)
    switch (k) {
    case PRE_GPT2: return STAGES(st_gpt2);
    case PRE_LLAMA3: return STAGES(st_llama3);
    case PRE_QWEN2: return STAGES(st_qwen2);
    case PRE_QWEN35: return STAGES(st_qwen35);
    case PRE_STARCODER: return STAGES(st_starcoder);
    case PRE_DEEPSEEK_LLM: return STAGES(st_deepseek_llm);
    case PRE_DEEPSEEK_CODER: return STAGES(st_deepseek_coder);
    case PRE_DEEPSEEK3: return STAGES(st_deepseek3);
    case PRE_DEFAULT: break;
    }
    return STAGES(st_default);
#undef STAGES
}

static moe_status run_stage(const stage *st, const ptext *t, size_t a, size_t b, seglist *out) {
    switch (st->op) {
    case ST_GPT2: return split_gpt2(t, a, b, out);
    case ST_LLAMA3: return split_llama3(t, a, b, out, st->max, st->marks);
    case ST_TRAIL_WS: return split_trailing_ws(t, a, b, out);
    default: return split_matches(st, t, a, b, out);
    }
}

moe_status pretok_split(pretok_kind kind, const uint32_t *cps, size_t n, size_t **lens,
                        size_t *n_lens) {
    *lens = NULL;
    *n_lens = 0;
    if (!n) return MOE_OK;
    uint16_t *fl = moe_malloc(n * sizeof(uint16_t));
    uint8_t *rx = moe_malloc(n);
    seglist cur = {0}, next = {0};
    moe_status s = MOE_OK;
    if (!fl || !rx || (s = seg_push(&cur, n))) {
        s = MOE_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        fl[i] = (uint16_t)unicode_class_bits(cps[i]);
        rx[i] = rx_class(cps[i], fl[i]);
    }
    ptext t = {cps, fl, rx};
    size_t ns;
    const stage *st = stages_of(kind, &ns);
    for (size_t k = 0; k < ns; k++) {
        next.n = 0;
        size_t at = 0;
        for (size_t j = 0; j < cur.n; j++) {
            if ((s = run_stage(&st[k], &t, at, at + cur.v[j], &next))) goto done;
            at += cur.v[j];
        }
        seglist tmp = cur;
        cur = next;
        next = tmp;
    }
    *lens = cur.v;
    *n_lens = cur.n;
    cur.v = NULL;
done:
    moe_free(cur.v);
    moe_free(next.v);
    moe_free(fl);
    moe_free(rx);
    return s;
}
