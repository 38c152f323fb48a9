#!/usr/bin/env bash
# Start the machine's PostgreSQL and Redis if they are installed but not answering.
# These are the machine's own services, left running for later runs (they are not ours to stop).
set -uo pipefail
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! port_open 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "services: starting PostgreSQL"
    version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort | head -n1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  else
    echo "services: PostgreSQL is not running on 127.0.0.1:5432 and not installed here"
  fi
fi
if ! port_open 6379; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "services: starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  else
    echo "services: Redis is not running on 127.0.0.1:6379 and not installed here"
  fi
fi
for _ in $(seq 1 30); do port_open 5432 && port_open 6379 && exit 0; sleep 1; done
echo "services: PostgreSQL or Redis still not answering" >&2
exit 0
