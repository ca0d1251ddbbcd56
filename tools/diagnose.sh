#!/usr/bin/env bash
# Run by `make test` / `make test-slow` when they fail: what the test log cannot show (Ray's own logs of the
# last local session, kernel OOM kills, memory and disk).
echo "=== diagnose: $(date -u +%FT%TZ)"
free -m || true
df -h . /tmp || true
(dmesg 2>/dev/null | tail -n 20) || true
logs=/tmp/ray/session_latest/logs
if [ -d "$logs" ]; then
  for f in "$logs"/python-core-driver-*.log "$logs"/raylet.out "$logs"/gcs_server.out; do
    [ -f "$f" ] || continue
    echo "=== $f (warnings, errors, last lines)"
    grep -E " (W|E|C|F) [0-9]+ [0-9]+\]" "$f" | tail -n 20 || true
    tail -n 5 "$f"
  done
fi
