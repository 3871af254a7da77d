# Sourced by serve.sh and test.sh: makes .venv with requirements.txt installed (again whenever
# it changes) and puts it first on PATH. CIRCUS_DEV=1 (test.sh) adds requirements-dev.txt.
# CIRCUS_USE_SYSTEM_PYTHON=1 uses the python3 on PATH as it is (the Docker image does).
if [ -z "${CIRCUS_USE_SYSTEM_PYTHON:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  req_files=(requirements.txt)
  if [ -n "${CIRCUS_DEV:-}" ]; then req_files+=(requirements-dev.txt); fi
  for req in "${req_files[@]}"; do
    wanted=$(sha256sum "$req" | cut -c1-64)
    stamp=.venv/.${req%.txt}-sha256
    if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
      echo "Installing $req into .venv ..." >&2
      .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
      echo "$wanted" >"$stamp"
    fi
  done
  export PATH="$PWD/.venv/bin:$PATH"
fi
