#!/usr/bin/env bash
# The load benchmark of BENCHMARKS.md, in one command:
#
#   bench/run.sh            # full run (about 14 minutes); publishes bench/results.md and BENCHMARKS.md's table
#   bench/run.sh --quick    # 5x shorter loads, to check the setup (not published)
#
# Builds imagegate (release), then bench/loadbench.py starts two mock upstreams, and for each
# scenario the mock directly, nginx, and imagegate in front of the same mock, each driven by
# oha. 127.0.0.1 only, ports picked at run time, every load bounded. Not run by CI.
#
# Needs: cargo, python3, oha (`cargo install oha --locked`), nginx (Debian `nginx-light`).
# Extra arguments go to loadbench.py (see `python3 bench/loadbench.py --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
command -v oha >/dev/null 2>&1 || missing+=("oha: cargo install oha --locked")
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=("nginx: apt-get install nginx-light")
command -v python3 >/dev/null 2>&1 || missing+=("python3")
if (( ${#missing[@]} )); then
  printf 'missing: %s\n' "${missing[@]}" >&2
  exit 1
fi

# ~1200 client connections plus as many upstream ones, per process.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"  # at least ~5000 needed

cargo build --release --locked --bin imagegate

publish=(--publish)
for arg in "$@"; do
  [[ "$arg" == --quick || "$arg" == --only* ]] && publish=()
done
exec python3 bench/loadbench.py --imagegate target/release/imagegate "${publish[@]}" "$@"
