#!/usr/bin/env bash
# The README's "Drop it into your engine" block must be, line for line, the
# code between the snippet markers of examples/drop_in/drop_in.cpp (which CI
# compiles and runs), so the README cannot rot.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
example=$(sed -n '/\/\/ \[snippet\]/,/\/\/ \[\/snippet\]/p' "$root/examples/drop_in/drop_in.cpp" | sed '1d;$d' | sed 's/^    //')
readme=$(sed -n '/<!-- drop-in snippet -->/,/<!-- \/drop-in snippet -->/p' "$root/README.md" | sed '1,2d;$d' | sed '$d')
if [ "$example" != "$readme" ]; then
  echo "README's drop-in block differs from examples/drop_in/drop_in.cpp:"
  diff <(echo "$readme") <(echo "$example") || true
  exit 1
fi
echo "README drop-in block matches examples/drop_in/drop_in.cpp"
