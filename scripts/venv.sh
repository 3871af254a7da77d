# Sourced by serve.sh and test.sh: makes .venv with requirements.txt installed (again whenever
# requirements.txt changes) and puts it first on PATH.
# CIRCUS_USE_SYSTEM_PYTHON=1 uses the python3 on PATH as it is (the Docker image does).
if [ -z "${CIRCUS_USE_SYSTEM_PYTHON:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  wanted=$(sha256sum requirements.txt | cut -c1-64)
  if [ "$(cat .venv/.requirements-sha256 2>/dev/null)" != "$wanted" ]; then
    echo "Installing requirements.txt into .venv ..." >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
    echo "$wanted" >.venv/.requirements-sha256
  fi
  export PATH="$PWD/.venv/bin:$PATH"
fi
