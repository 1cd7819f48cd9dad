#!/usr/bin/env bash
# Known bugs must be caught: apply each tests/mutants/*.patch (a small plausible bug, listed in
# issue 10) to a temporary copy of the tree, run the fast-tier tests its header names, and
# expect the named test to FAIL. The tree itself is never modified. Exit 1 if any bug survives
# (or a patch no longer applies: regenerate it from the current code with `git diff`).
#   tests/mutants/check.sh [PATCH...]        (default: every patch)
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
patches=("$@")
[ ${#patches[@]} -eq 0 ] && patches=(tests/mutants/*.patch)
survived=0
for patch in "${patches[@]}"; do
    name=$(basename "$patch" .patch)
    tests=$(sed -n 's/^# tests: //p' "$patch")
    expect=$(sed -n 's/^# expect: //p' "$patch")
    tmp=$(mktemp -d /tmp/pvnet-mutant.XXXXXX)
    git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$tmp"
    if ! (cd "$tmp" && git apply --whitespace=nowarn "$root/$patch"); then
        echo "MUTANT $name: patch does not apply"
        survived=1
    else
        out=$(cd "$tmp" && timeout 600 python3 -m pytest -q -p no:cacheprovider -m "not full" \
              $tests 2>&1)
        if echo "$out" | grep -q "^FAILED .*::${expect}\b"; then
            echo "MUTANT $name: caught by $expect: $(echo "$out" | grep -m1 '^E ' | cut -c1-150)"
        else
            echo "MUTANT $name: SURVIVED ($expect did not fail)"
            echo "$out" | tail -5
            survived=1
        fi
    fi
    rm -rf "$tmp"
done
exit $survived
