#!/usr/bin/env bash
# Do the tests catch a wrong position map? Plant one bug at a time in a throw-away worktree of HEAD and count
# the failing tests (oracle, positions, backends, flex, families). Expect "clean" to pass and both plants to fail.
#   bash benchmarks/planted_bugs.sh
set -u
repo=$(git rev-parse --show-toplevel)
py=${PYTHON:-$repo/.venv/bin/python}
tree=$(mktemp -d)/plant
git -C "$repo" worktree add -f "$tree" HEAD >/dev/null 2>&1
trap 'git -C "$repo" worktree remove --force "$tree" >/dev/null 2>&1' EXIT
cd "$tree"
run() {
  PYTHONPATH="$tree/src" timeout 900 "$py" -m pytest -q -p no:cacheprovider tests/test_oracle.py \
    tests/test_positions.py tests/test_backends.py tests/test_flex.py tests/test_families.py 2>&1 | tail -1
}
echo "clean: $(run)"
"$py" - <<'PY'
p = "src/selfextend/positions.py"; s = open(p).read()
s = s.replace("+ (window - window // group_size)", "+ (window - window // group_size + 1)", 1); open(p, "w").write(s)
PY
echo "grouped query at i // G + W - W // G + 1: $(run)"
git checkout -q src
"$py" - <<'PY'
p = "src/selfextend/backends/base.py"; s = open(p).read()
s = s.replace("return (distance >= self.window).long()", "return (distance > self.window).long()", 1)
open(p, "w").write(s)
p = "src/selfextend/backends/flex.py"; s = open(p).read()
s = s.replace("kpos_p[b, kv_idx] < w)", "kpos_p[b, kv_idx] <= w)").replace("kpos_p[b, kv_idx] >= w)", "kpos_p[b, kv_idx] > w)")
open(p, "w").write(s)
PY
echo "neighbor test i - j <= W in reference and flex: $(run)"
