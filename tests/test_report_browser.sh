#!/usr/bin/env bash
# tests/test_report_browser.sh: a moe report opened in headless Chromium (Debian's
# chromium package, installed by scripts/setup.sh; skipped with the reason when absent).
#  - a screenshot: a PNG of the window's size, whose pixels hold the expert
#    colours of the load bars (so the charts were drawn, not a blank page);
#  - the DOM after the page's script ran (--dump-dom of a copy with
#    tests/report_probe.js appended): every section, one chart per MoE layer with
#    E bars, one line per layer in each balance chart and a legend in the lines'
#    colours, nd x E and E x E heat-map cells;
#  - the hover view: mouseover on tokens fills the expert panel with that token's
#    experts and weights in every layer, as report.json says;
#  - no errors: window.onerror, unhandled rejections and console.error captured from
#    the top of <head>, and no "Uncaught" or console line in Chromium's own log; a
#    copy with a deliberate error shows both checks catch one.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
. tests/lib.sh report_browser
PY=/usr/bin/python3

CHROME=""
for c in /usr/lib/chromium/chromium chromium chromium-browser; do
    if command -v "$c" >/dev/null 2>&1; then CHROME=$(command -v "$c"); break; fi
done
if [ -z "$CHROME" ]; then
    skip "report in headless chromium" "chromium is not installed (scripts/setup.sh installs Debian's chromium; it could not here)"
    finish
fi
cd "$T"

# browse ARGS... URL: one headless Chromium with a fresh profile; stdout in $T/b.out, its log in $T/b.err.
# --no-sandbox: Chromium's sandbox refuses to start as root (and in most containers).
browse() {
    local prof; prof=$(mktemp -d "$T/profile.XXXXXX")
    timeout -k 5 40 "$CHROME" --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --no-first-run --user-data-dir="$prof" \
        --enable-logging=stderr --v=0 "$@" >"$T/b.out" 2>"$T/b.err"
    BRC=$?
}
# page_errors: lines of Chromium's log that are the page's errors or console output
page_errors() { grep -E 'Uncaught|:CONSOLE' "$T/b.err"; }

# a tiny model with two MoE layers over two domains, and its report with a training log
mkdir -p dom
awk 'BEGIN { srand(3); for (i = 0; i < 200; i++) print "the quick brown fox jumps over the lazy dog " int(rand() * 9) }' >dom/prose.txt
awk 'BEGIN { srand(4); for (i = 0; i < 200; i++) print "def f(x): return x * " int(rand() * 9) " + 1" }' >dom/code.txt
"$MOE" train --data dom --set d_model=32 --set n_layers=3 --set moe_first_dense=1 --set n_heads=2 --set n_kv_heads=1 \
    --set d_ff=64 --set n_experts=4 --set top_k=2 --set d_expert=32 --set max_seq=32 --set vocab_size=300 \
    --steps 20 --batch 4 --seq 16 --threads 1 --eval-every 0 --out m.gguf --log m.jsonl >train.out 2>&1 \
    || { bad "train the tiny model" "$(tail -c 300 train.out)"; finish; }
"$MOE" report --model m.gguf --data dom --log m.jsonl --max-tokens 600 --threads 1 \
    --prompt 'the quick brown fox & <dog>; def f(x): return x * 3' --out report.html >rep.out 2>&1 \
    || { bad "write the report" "$(tail -c 300 rep.out)"; finish; }

# 1. screenshot of the page as it is
browse --window-size=1000,700 --screenshot="$T/shot.png" "file://$T/report.html"
if [ "$BRC" -ne 0 ] || [ ! -s shot.png ]; then
    bad "screenshot" "chromium exit $BRC: $(grep -v dbus b.err | tail -c 400)"
else
    "$PY" - shot.png 1000 700 <<'EOF' && ok "screenshot: a 1000x700 PNG, not blank" || bad "screenshot" "see above"
import struct, sys, zlib
png, W, H = open(sys.argv[1], "rb").read(), int(sys.argv[2]), int(sys.argv[3])
assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
w, h = struct.unpack(">II", png[16:24])
assert (w, h) == (W, H), f"{w}x{h}, expected {W}x{H}"
assert len(png) > 5000, f"only {len(png)} bytes"
EOF
    [ -z "$(page_errors)" ] && ok "screenshot: the page logged nothing" || bad "page log" "$(page_errors | head -3)"
fi

# 2. a copy with the error catcher at the top of <head> and the probe after the page's script
catcher='<script>window.__probeErrors=[];window.addEventListener("error",function(e){window.__probeErrors.push("error: "+e.message)});window.addEventListener("unhandledrejection",function(e){window.__probeErrors.push("rejection: "+e.reason)});(function(c){console.error=function(){window.__probeErrors.push("console.error: "+Array.prototype.join.call(arguments," "));c.apply(console,arguments)}})(console.error);</script>'
inject() { # IN OUT [EXTRA-SCRIPT]: the copy with catcher, extra script (before the page's) and probe
    "$PY" - "$1" "$2" "$catcher" "$ROOT/tests/report_probe.js" "${3:-}" <<'EOF'
import sys
src, dst, catcher, probe, extra = sys.argv[1:6]
page = open(src, encoding="utf-8").read()
assert page.count("<head>") == 1 and page.count("</body>") == 1
page = page.replace("<head>", "<head>" + catcher, 1)
if extra: page = page.replace("<script>(function(){var D=", "<script>" + extra + "</script>\n<script>(function(){var D=", 1)
page = page.replace("</body>", "<script>" + open(probe, encoding="utf-8").read() + "</script>\n</body>", 1)
open(dst, "w", encoding="utf-8").write(page)
EOF
}
inject report.html probe.html
browse --dump-dom "file://$T/probe.html"
cp b.err probe.err
if [ "$BRC" -ne 0 ] || ! grep -q 'id="probe-result"' b.out; then
    bad "dump-dom" "chromium exit $BRC, no probe result: $(grep -v dbus b.err | tail -c 400)"
else
    "$PY" - b.out report.json <<'EOF' >check.out 2>&1
import html, json, re, sys
dom = open(sys.argv[1], encoding="utf-8").read()
d = json.load(open(sys.argv[2], encoding="utf-8"))
m = re.findall(r"<pre id=\"probe-result\">(.*?)</pre>", dom, re.S)
R = json.loads(html.unescape(m[-1]))
L, E, nd = len(d["layers"]), d["n_experts"], len(d["domains"])
res = []
def check(name, cond, detail=""):
    res.append(name)
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else "\t" + str(detail)[:400]))
check("dom: every section", R["sections"] == ["load", "training", "domains", "vocabulary", "coactivation", "saturation", "tokens"], R["sections"])
check(f"dom: {L} load charts of {E} bars", R["load"] == [E] * L, R["load"])
check(f"dom: 4 balance charts of {L} lines", R["training"] == [L] * 4, R["training"])
check("dom: the balance legend names each layer in its line's colour",
      R["legend"] == [[f"layer {l}", c] for l, c in zip(d["layers"], R["strokes"])] and len(set(R["strokes"])) == L, (R["legend"], R["strokes"]))
check(f"dom: {L} domain x expert maps of {nd}x{E}", R["domains"] == [nd * E] * L, R["domains"])
check(f"dom: {L} co-activation maps of {E}x{E}", R["coactivation"] == [E * E] * L, R["coactivation"])
view = d["view"]
check(f"dom: {len(view)} tokens in the per-token view", R["tokens"] == len(view) and len(view) > 4, R["tokens"])
# a token's background is the colour of its top expert in the first MoE layer: one colour per expert
col = {}
same = all(col.setdefault(t["layers"][0]["experts"][0], bg) == bg for t, bg in zip(view, R["backgrounds"]))
check("dom: token colours follow the top expert", same and len(set(col.values())) == len(col), col)
check("hover: the panel starts empty", R["before"] == "hover a token", R["before"])
bad = []
for h in R["hover"]:
    t = view[h["i"]]
    if h["head"] != f"token {t['token']}" or f"(position {h['i']})" not in h["text"]: bad.append((h["i"], h["head"], h["text"][:60]))
    if len(h["rows"]) != len(t["layers"]): bad.append((h["i"], "rows", h["rows"])); continue
    for row, l in zip(h["rows"], t["layers"]):
        cells = row[1].split(", ")
        want = [(e, w) for e, w in zip(l["experts"], l["weights"])]
        okrow = row[0] == str(l["layer"]) and len(cells) == len(want)
        for c, (e, w) in zip(cells, want):
            if e < 0: okrow &= c == "-"; continue
            mm = re.fullmatch(r"(\d+) \((\d+\.\d{3})\)", c)
            okrow &= bool(mm) and int(mm.group(1)) == e and abs(float(mm.group(2)) - w) <= 0.0005 + 1e-9
        if not okrow: bad.append((h["i"], row, l))
check(f"hover: {len(R['hover'])} tokens show their experts and weights in all {L} layers", len(R["hover"]) == 4 and not bad, bad[:3])
texts = [h["text"] for h in R["hover"]]
check("hover: the panel changes with the token", len(set(texts)) == len(texts), texts)
check("no page errors (onerror, rejections, console.error)", R["errors"] == [], R["errors"])
# the load bars' colours, for the screenshot check
open("fills.json", "w").write(json.dumps(R["barFills"]))
EOF
    while read -r st rest; do
        case "$st" in ok) ok "$rest" ;; FAIL) bad "${rest%%$'\t'*}" "${rest#*$'\t'}" ;; esac
    done <check.out
    grep -qE '^(ok|FAIL) ' check.out || bad "dom checks" "$(tail -c 600 check.out)"
    [ -z "$(page_errors)" ] && ok "dom: chromium's log has no page error" || bad "page log" "$(page_errors | head -3)"
fi

# 3. the screenshot shows the charts: the pixels hold every load bar's colour
if [ -s shot.png ] && [ -s fills.json ]; then
    "$PY" - shot.png fills.json <<'EOF' && ok "screenshot: the load bars are drawn in their expert colours" || bad "screenshot colours" "see above"
import json, re, struct, sys, zlib
png = open(sys.argv[1], "rb").read()
fills = {tuple(map(int, re.findall(r"\d+", f)[:3])) for f in json.load(open(sys.argv[2]))}
pos, idat, W, H, ctype = 8, b"", 0, 0, 0
while pos < len(png):
    n, typ = struct.unpack(">I4s", png[pos:pos + 8]); body = png[pos + 8:pos + 8 + n]; pos += 12 + n
    if typ == b"IHDR": W, H, depth, ctype = struct.unpack(">IIBB", body[:10]); assert depth == 8 and ctype in (2, 6)
    elif typ == b"IDAT": idat += body
bpp = 4 if ctype == 6 else 3
raw, stride, prev, seen = zlib.decompress(idat), W * bpp, bytearray(W * bpp), set()
for y in range(H):   # undo the PNG row filters
    f, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for x in range(stride):
        a = row[x - bpp] if x >= bpp else 0; b = prev[x]; c = prev[x - bpp] if x >= bpp else 0
        if f == 1: row[x] = (row[x] + a) & 255
        elif f == 2: row[x] = (row[x] + b) & 255
        elif f == 3: row[x] = (row[x] + ((a + b) >> 1)) & 255
        elif f == 4:
            p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            row[x] = (row[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    seen.update(tuple(row[i:i + 3]) for i in range(0, stride, bpp))
    prev = row
missing = fills - seen
assert not missing, f"bar colours {sorted(missing)} not in the screenshot ({len(seen)} colours)"
assert len(seen) > 50, f"only {len(seen)} colours"
EOF
fi

# 4. the checks catch an error: a copy whose extra script throws before the page's own
inject report.html broken.html 'undefinedFunctionOfTheProbe();'
browse --dump-dom "file://$T/broken.html"
if grep -q 'error: .*undefinedFunctionOfTheProbe' b.out && page_errors | grep -q 'Uncaught.*undefinedFunctionOfTheProbe'; then
    ok "a page error is caught by both the page's catcher and chromium's log"
else
    bad "error detection" "probe: $(grep -o 'probe-result">[^<]*' b.out | head -c 200); log: $(page_errors | head -2)"
fi
finish
