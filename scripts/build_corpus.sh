#!/usr/bin/env bash
# Builds moe's training corpus from free text in Debian packages.
#
#   scripts/build_corpus.sh            full corpus   -> data/corpus/<domain>.txt  (~50 MB)
#   scripts/build_corpus.sh --small    small slice   -> data/corpus-small/<domain>.txt (~0.5 MB each)
#   --force                            rebuild even if the output is complete
#
# Domains: english german french spanish c python numbers.  Inside a file,
# documents are separated by a line holding only a form feed.
# Packages are fetched with `apt-get download` into data/debs/ (kept as a
# cache) and unpacked with `dpkg-deb -x` into a temporary directory: nothing
# is installed.  The output is written to a temporary directory, stamped and
# then renamed, so an interrupted run never leaves a corpus that looks done.
set -euo pipefail

CORPUS_VERSION=1            # bump when the output changes, to force rebuilds
PACKAGES=(
    r-cran-janeaustenr sword-text-web                   # english
    libreoffice-help-de fortunes-de                     # german
    libreoffice-help-fr manpages-fr                     # french
    libreoffice-help-es sword-text-sparv fortunes-es    # spanish
    newlib-source                                       # c
    libpython3.11-stdlib                                # python
    python3-statsmodels                                 # numbers
)
DOMAINS=(english german french spanish c python numbers)

small=0
force=0
for arg in "$@"; do
    case "$arg" in
        --small) small=1 ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "build_corpus: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
root=$PWD
data=${MOE_DATA_DIR:-$root/data}
if [ $small -eq 1 ]; then out=$data/corpus-small; kind=small; else out=$data/corpus; kind=full; fi
stamp_text="moe-corpus v$CORPUS_VERSION $kind"

die() { echo "build_corpus: $*" >&2; exit 1; }

is_complete() {
    [ -f "$out/.complete" ] && [ "$(cat "$out/.complete")" = "$stamp_text" ] || return 1
    local d
    for d in "${DOMAINS[@]}"; do [ -s "$out/$d.txt" ] || return 1; done
}

if [ $force -eq 0 ] && is_complete; then
    echo "corpus: $out is complete ($stamp_text)"
    exit 0
fi

PY=/usr/bin/python3
[ -x "$PY" ] || die "needs $PY (Debian's python3; scripts/setup.sh installs it)"
command -v apt-get >/dev/null || die "needs apt-get (a Debian system)"
command -v dpkg-deb >/dev/null || die "needs dpkg-deb (a Debian system)"

mkdir -p "$data/debs"
# one build at a time; a second one waits and then finds the work done
exec 9>"$data/.corpus.lock"
if command -v flock >/dev/null; then
    flock 9
    if [ $force -eq 0 ] && is_complete; then
        echo "corpus: $out is complete ($stamp_text)"
        exit 0
    fi
    # leftovers of a build that was killed (we hold the lock, so none is running)
    rm -rf "$data"/.corpus-work.* "$data"/.corpus-small.* "$data"/.corpus-full.* "$data"/debs/.dl.*
fi

t_start=$(date +%s)
echo "corpus: building the $kind corpus into $out"

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
APT_OPTS=(-q)
# as root, apt drops to the _apt user for downloads, which cannot write here
[ "$(id -u)" -eq 0 ] && APT_OPTS+=(-o APT::Sandbox::User=root)

cached_deb() {  # newest cached .deb of a package, or nothing
    ls "$data/debs/$1"_*.deb 2>/dev/null | sort -V | tail -n 1
}

download() {  # apt-get download into a scratch dir; only whole files reach the cache
    local tmp rc=0
    tmp=$(mktemp -d "$data/debs/.dl.XXXXXX")
    ( cd "$tmp" && apt-get "${APT_OPTS[@]}" download "$@" ) >"$tmp.log" 2>&1 || rc=$?
    if [ $rc -eq 0 ]; then
        mv "$tmp"/*.deb "$data/debs/" 2>/dev/null || true
    fi
    [ $rc -eq 0 ] || grep '^E:' "$tmp.log" > "$data/debs/.last-error" || true
    rm -rf "$tmp" "$tmp.log"
    return $rc
}

missing=()
for p in "${PACKAGES[@]}"; do
    [ -n "$(cached_deb "$p")" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "corpus: downloading ${#missing[@]} packages: ${missing[*]}"
    if ! download "${missing[@]}"; then
        # on a fresh machine the package lists may be missing or stale
        echo "corpus: apt-get download failed; running apt-get update and trying again"
        $SUDO apt-get -q update >/dev/null || echo "build_corpus: apt-get update failed" >&2
        if ! download "${missing[@]}"; then
            failed=()
            for p in "${missing[@]}"; do
                [ -n "$(cached_deb "$p")" ] || download "$p" 2>/dev/null || failed+=("$p")
            done
            if [ ${#failed[@]} -gt 0 ]; then
                sed 's/^/  apt: /' "$data/debs/.last-error" >&2 2>/dev/null || true
                die "cannot download package(s): ${failed[*]} (is Debian 12 'bookworm' main in the apt sources?)"
            fi
        fi
    fi
fi

work=$(mktemp -d "$data/.corpus-work.XXXXXX")
tmp_out=$(mktemp -d "$data/.corpus-$kind.XXXXXX")
cleanup() { rm -rf "$work" "$tmp_out"; }
trap cleanup EXIT

for p in "${PACKAGES[@]}"; do
    deb=$(cached_deb "$p")
    [ -n "$deb" ] || die "package $p is not in $data/debs"
    if ! dpkg-deb -x "$deb" "$work/$p" 2>"$work/err"; then
        rm -f "$deb"   # a damaged download: fetch it again next time
        die "cannot unpack $deb for package $p: $(head -n 2 "$work/err")"
    fi
done
t_fetch=$(date +%s)
echo "corpus: packages ready in $((t_fetch - t_start))s"

args=(--root "$work" --out "$tmp_out")
[ $small -eq 1 ] && args+=(--small)
PYTHONDONTWRITEBYTECODE=1 "$PY" "$root/scripts/corpus/build.py" "${args[@]}" || die "building the corpus failed"

for d in "${DOMAINS[@]}"; do
    [ -s "$tmp_out/$d.txt" ] || die "domain $d came out empty"
done
chmod 755 "$tmp_out"
echo "$stamp_text" > "$tmp_out/.complete"
rm -rf "$out"
mv "$tmp_out" "$out"
trap - EXIT
rm -rf "$work"
total=$(du -sb "$out" | cut -f1)
echo "corpus: $kind corpus complete: $out, $(awk -v b="$total" 'BEGIN{printf "%.1f", b/1e6}') MB in $(( $(date +%s) - t_start ))s"
