#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need, then runs the Swift
# package's tests (where a Swift toolchain exists) and the Python tests. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]" -c constraints.txt
if [ -f swift/Package.swift ]; then
  if command -v swift >/dev/null 2>&1; then
    swift build --package-path swift
    swift test --package-path swift
  else
    echo "swift not found: the Swift package's tests were skipped"
  fi
fi
python3 -m pytest "$@"
