# Sourced by the scripts: cached virtual environments under .venvs/, one per requirements set.
# ensure_venv NAME REQFILE [torch]  -> prints the venv's path, creating it when missing.
# The folder name carries a hash of the requirements file, every pyproject.toml and the torch spec, so
# a changed pin makes a new venv and an unchanged one is reused in seconds.
EDITSTACK_TORCH_SPEC=${EDITSTACK_TORCH_SPEC:-torch==2.13.0}

ensure_venv() {
  local name=$1 req=$2 torch=${3:-}
  local key dir
  key=$(cat "$req" shared/pyproject.toml editor/pyproject.toml scorer/pyproject.toml 2>/dev/null \
        | { cat; if [ -n "$torch" ]; then echo "$EDITSTACK_TORCH_SPEC"; fi; } | sha256sum | cut -c1-12)
  dir=".venvs/$name-$key"
  if [ ! -f "$dir/.complete" ]; then
    echo "creating $dir from $req" >&2
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip >&2
    if [ -n "$torch" ]; then "$dir/bin/pip" install -q "$EDITSTACK_TORCH_SPEC" >&2; fi
    "$dir/bin/pip" install -q -r "$req" >&2
    touch "$dir/.complete"
  fi
  echo "$dir"
}
