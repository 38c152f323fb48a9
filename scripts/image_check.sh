#!/usr/bin/env bash
# The container image, built from the Dockerfile and run, on a machine without a Docker engine or
# an image registry (docs/operations.md, "Container image check"):
#
#   1. installs Debian's docker.io and debootstrap if missing (says so), and starts a dockerd of
#      its own (no bridge, no iptables; its own data root, exec root, pidfile and socket under
#      $IMAGE_CHECK_CACHE), stopped by its PID when the script ends, whatever the outcome;
#   2. makes, once (cached in that daemon), a stand-in for rayproject/ray: Debian bookworm from
#      debootstrap + `docker import`, Python 3.11, user `ray` (uid 1000, gid 100, home /home/ray)
#      owning a venv first on PATH, this machine's CA bundle;
#   3. builds the Dockerfile unchanged with `--build-arg RAY_IMAGE=<that base>`; the CPU torch
#      wheel of this machine's disk is served to the build's pip from 127.0.0.1 only (never in a
#      layer), so pip does not pull the multi-GB CUDA build;
#   4. as the image's non-root user: the CLI transcribes and diarizes real clips of tests/data
#      (checked against their references), then `python -m serve` answers the OpenAI client.
#
# Host networking throughout (build and containers): everything is on 127.0.0.1, no bridge.
# Usage: sudo bash scripts/image_check.sh        (root: it runs a dockerd)
# Env: IMAGE_CHECK_CACHE (default /var/cache/speech-image), IMAGE_CHECK_KEEP_IMAGE=0 removes the
#      built image at the end (default: kept, so the next run reuses its layers),
#      IMAGE_CHECK_NO_CACHE=1 builds the image without the layer cache (the base stays cached).
# Ends with one line: "image_check: PASS", "image_check: FAIL (...)" or "image_check: skipped: ...".
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

CACHE=${IMAGE_CHECK_CACHE:-/var/cache/speech-image}
KEEP_IMAGE=${IMAGE_CHECK_KEEP_IMAGE:-1}
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
IMAGE=speech-service:image-check
NEED_FREE_GB=15
WHEEL_PORT=${IMAGE_CHECK_WHEEL_PORT:-47610}

step=start
summary=()
containers=()
dockerd_pid=
wheel_server_pid=
work=

log() { printf 'image_check: %s\n' "$*"; }
skip() { log "skipped: $*"; exit 0; }
now() { date +%s; }
record() { summary+=("$(printf '%-24s %s' "$1" "$2")"); }

cleanup() {
  local status=$?
  set +e
  for c in "${containers[@]}"; do
    docker_ rm -f "$c" >/dev/null 2>&1
  done
  if [ -n "$wheel_server_pid" ]; then
    kill "$wheel_server_pid" 2>/dev/null
    wait "$wheel_server_pid" 2>/dev/null
  fi
  if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
    kill -TERM "$dockerd_pid"
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$dockerd_pid" 2>/dev/null; then
      log "dockerd ($dockerd_pid) did not stop in 30 s: SIGKILL, and its containerd"
      kill -KILL "$dockerd_pid"
      [ -s "$work/exec/containerd/containerd.pid" ] && kill -KILL "$(cat "$work/exec/containerd/containerd.pid")"
    fi
    wait "$dockerd_pid" 2>/dev/null
  fi
  if [ -n "$work" ]; then
    # What that dockerd left mounted under its exec root (its network namespace), deepest first.
    awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do
      umount "$m" || umount -l "$m"
    done
    rm -rf "$work"
  fi
  if [ "$status" != 0 ]; then
    if [ ${#summary[@]} -gt 0 ]; then printf '%s\n' "${summary[@]}"; fi
    log "FAIL (step: $step, exit $status)"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 1. tools, daemon -------------
step=prerequisites
started_at=$(now)
[ "$(id -u)" = 0 ] || skip "needs root (it runs its own dockerd and debootstrap); run it with sudo"
if ! .venv/bin/python -c 'import openai, speech.evaluation' 2>/dev/null; then
  log "FAIL: no .venv with the openai client: run bash scripts/setup.sh --dev first"
  exit 2
fi

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || skip "no ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]} (Debian packages)"
  # The packages' maintainer scripts must not start a system dockerd (it would make a bridge).
  policy_made=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    policy_made=1
  fi
  apt_out=$( { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${missing[@]}"; } 2>&1 ) || apt_failed=1
  [ "$policy_made" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ -z "${apt_failed:-}" ] || skip "apt-get could not install ${missing[*]}: $(tail -n 1 <<<"$apt_out")"
fi
# The client that comes with the daemon (Debian's), not another one found first on PATH.
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=$(command -v docker) || skip "no docker client"

mkdir -p "$CACHE/docker" "$CACHE/logs"
# One run at a time per cache (one daemon per data root).
exec 9>"$CACHE/lock"
flock -n 9 || { log "FAIL: another image_check is using $CACHE"; exit 1; }
free_gb=$(df -P -BG "$CACHE" | awk 'NR==2 {sub("G", "", $4); print $4}')
[ "$free_gb" -ge "$NEED_FREE_GB" ] || skip "only ${free_gb} GB free under $CACHE (needs ~${NEED_FREE_GB})"

# Its own run directory: short path (containerd's socket lives under it), gone afterwards.
work=$(mktemp -d /tmp/speech-image.XXXXXX)
SOCK=$work/docker.sock
docker_() { DOCKER_BUILDKIT=0 "$DOCKER" -H "unix://$SOCK" "$@"; }

step=dockerd
echo '{}' >"$work/daemon.json"
log "starting dockerd (data root $CACHE/docker, log $CACHE/logs/dockerd.log)"
dockerd --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
  --config-file "$work/daemon.json" --data-root "$CACHE/docker" --exec-root "$work/exec" \
  --pidfile "$work/dockerd.pid" -H "unix://$SOCK" >"$CACHE/logs/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 120); do
  docker_ version >/dev/null 2>&1 && break
  if ! kill -0 "$dockerd_pid" 2>/dev/null; then
    dockerd_pid=
    skip "no Docker daemon can run here: $(grep -v '^$' "$CACHE/logs/dockerd.log" | tail -n 1)"
  fi
  sleep 0.5
done
docker_ version >/dev/null 2>&1 || skip "dockerd did not answer within 60 s (log: $CACHE/logs/dockerd.log)"
log "dockerd $(docker_ version -f '{{.Server.Version}}') running as PID $dockerd_pid, storage $(docker_ info -f '{{.Driver}}')"

# ---------------------------------------------------------------- 2. the base image ------------
step=base-image
base_dir=$work/base
mkdir -p "$base_dir"
cp /etc/ssl/certs/ca-certificates.crt "$base_dir/ca-certificates.crt"
# What rayproject/ray gives the Dockerfile: user ray (1000:100) owning the Python environment
# whose python/pip are first on PATH. ONBUILD ARG lets this check hand the build's pip a
# find-links URL (the CPU torch wheel) without any change to the Dockerfile; real builds on
# rayproject/ray have no such argument.
cat >"$base_dir/Dockerfile" <<'EOF'
FROM speech-image-rootfs
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN useradd -m -u 1000 -g 100 -s /bin/bash ray
USER 1000:100
RUN python3 -m venv /home/ray/venv \
    && /home/ray/venv/bin/python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version"
ENV PATH=/home/ray/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/home/ray \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
WORKDIR /home/ray
ONBUILD ARG PIP_FIND_LINKS
CMD ["bash"]
EOF
packages=python3,python3-venv,ca-certificates
recipe=$( { echo "$SUITE $MIRROR $packages"; cat "$base_dir/Dockerfile" "$base_dir/ca-certificates.crt"; } \
  | sha256sum | cut -c1-12)
BASE=speech-image-base:$SUITE-$recipe
if docker_ image inspect "$BASE" >/dev/null 2>&1; then
  log "base image $BASE: cached"
  record "base image" "cached ($BASE)"
else
  t0=$(now)
  rootfs=$CACHE/rootfs.tmp
  rm -rf "$rootfs"
  log "debootstrap $SUITE (minbase + $packages) -> $rootfs (log: $CACHE/logs/debootstrap.log)"
  debootstrap --variant=minbase --include="$packages" "$SUITE" "$rootfs" "$MIRROR" \
    >"$CACHE/logs/debootstrap.log" 2>&1 \
    || { tail -n 20 "$CACHE/logs/debootstrap.log"; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker_ import - speech-image-rootfs >/dev/null
  rm -rf "$rootfs"
  docker_ build --network host -t "$BASE" "$base_dir" >"$CACHE/logs/base.log" 2>&1 \
    || { tail -n 20 "$CACHE/logs/base.log"; exit 1; }
  docker_ rmi speech-image-rootfs >/dev/null 2>&1 || true
  record "base image" "built in $(($(now) - t0)) s ($BASE)"
fi
record "base image size" "$(docker_ image inspect -f '{{.Size}}' "$BASE" | numfmt --to=iec)"

# ---------------------------------------------------------------- 3. the service image ---------
step=torch-wheel
torch_version=$(sed -n 's/^TORCH_VERSION=//p' scripts/install.sh)
wheel_name="torch-${torch_version}+cpu-cp311-cp311-*$(uname -m).whl"
dirs=()
for d in $(pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p") ${PIP_FIND_LINKS:-} /opt/wheels; do
  dirs+=("${d#file://}")
done
wheel=
for d in "${dirs[@]}"; do
  for f in "$d"/$wheel_name; do
    if [ -f "$f" ]; then wheel=$f; break 2; fi
  done
done
[ -n "$wheel" ] || skip "no CPU torch $torch_version wheel ($wheel_name) in ${dirs[*]}: the build would pull CUDA torch"
mkdir -p "$work/wheels"
ln -s "$wheel" "$work/wheels/"
# Served on 127.0.0.1 only, for the build's pip (host networking), for as long as the build runs.
# A fixed port (the first free one from $WHEEL_PORT): the URL is a build argument, and a new
# value each run would make every RUN step of the Dockerfile miss the layer cache.
python3 -u - "$work/wheels" "$work/wheel_port" "$WHEEL_PORT" >"$CACHE/logs/wheel_server.log" 2>&1 <<'EOF' &
import functools, http.server, os, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
for port in range(int(sys.argv[3]), int(sys.argv[3]) + 20):
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        break
    except OSError:
        continue
else:
    sys.exit("no free port for the wheel server")
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(str(server.server_port))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
server.serve_forever()
EOF
wheel_server_pid=$!
for _ in $(seq 50); do [ -s "$work/wheel_port" ] && break; sleep 0.1; done
[ -s "$work/wheel_port" ] || { cat "$CACHE/logs/wheel_server.log"; exit 1; }
wheel_port=$(cat "$work/wheel_port")

step=image-build
t0=$(now)
log "docker build (RAY_IMAGE=$BASE, torch from $wheel via 127.0.0.1:$wheel_port; log: $CACHE/logs/build.log)"
cache_opt=()
[ "${IMAGE_CHECK_NO_CACHE:-0}" = 1 ] && cache_opt=(--no-cache)
if ! docker_ build "${cache_opt[@]}" --network host --build-arg "RAY_IMAGE=$BASE" \
    --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$wheel_port/" -t "$IMAGE" . >"$CACHE/logs/build.log" 2>&1; then
  tail -n 30 "$CACHE/logs/build.log"
  exit 1
fi
build_s=$(($(now) - t0))
kill "$wheel_server_pid" && wait "$wheel_server_pid" 2>/dev/null || true
wheel_server_pid=
# Unless pip already had torch from this wheel in a cached layer, it fetched it from here.
wheel_use="not fetched: install layer cached"
if grep -q 'GET /torch-' "$CACHE/logs/wheel_server.log"; then wheel_use="fetched by the build's pip"; fi
record "image build" "$build_s s"
record "image size" "$(docker_ image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec)"
docker_ image prune -f >/dev/null  # earlier builds' untagged images
user=$(docker_ image inspect -f '{{.Config.User}}' "$IMAGE")
[ "${user%%:*}" = 1000 ] || { log "the image's user is '$user', not 1000"; exit 1; }
torch_in_image=$(docker_ run --rm --network host "$IMAGE" bash -c \
  'python -c "import torch; print(torch.__version__)"; pip list 2>/dev/null | grep -ci "^nvidia-" || true')
read -r torch_version_in nvidia_count <<<"$(echo "$torch_in_image" | tr '\n' ' ')"
record "torch in the image" "$torch_version_in (wheel $wheel_use), $nvidia_count nvidia-* packages"
[ "$torch_version_in" = "$torch_version+cpu" ] && [ "$nvidia_count" = 0 ] \
  || { log "the image has torch $torch_version_in and $nvidia_count nvidia-* packages, not the CPU wheel"; exit 1; }

# Every container: host network, the image's own user (1000:100), CPU, no hub downloads.
run_opts=(--network host -e AI_DEVICE=cpu -e HF_HUB_OFFLINE=1 -e RAY_AUTH_MODE=disabled)

# ---------------------------------------------------------------- 4a. the CLI ------------------
step=cli
out=$work/cli-out
mkdir -p "$out" && chown 1000:100 "$out"
name=speech-image-check-cli-$$
containers+=("$name")
t0=$(now)
log "CLI: transcribe + diarize jfk.flac and conv2spk_75s.flac in the image"
docker_ run --rm --name "$name" "${run_opts[@]}" -v "$REPO/tests/data:/clips:ro" -v "$out:/out" \
  "$IMAGE" bash -c 'id -u && python -m speech transcribe /clips/jfk/jfk.flac /clips/conv2spk_75s.flac \
    --diarize --format diarized_json --output-dir /out' >"$CACHE/logs/cli.log" 2>&1 \
  || { tail -n 30 "$CACHE/logs/cli.log"; exit 1; }
record "CLI run (2 clips)" "$(($(now) - t0)) s"
[ "$(head -n 1 "$CACHE/logs/cli.log")" = 1000 ] || { log "the CLI did not run as uid 1000"; exit 1; }
cli_result=$(.venv/bin/python - "$out" tests/data <<'EOF'
import json, sys
from pathlib import Path
from speech.evaluation import word_error_rate

out, data = Path(sys.argv[1]), Path(sys.argv[2])
jfk = json.loads((out / "jfk.json").read_text())
wer = word_error_rate([(data / "jfk/jfk.txt").read_text()], [jfk["text"]])
assert wer <= 0.05, f"jfk: WER {wer:.3f}: {jfk['text']!r}"
conv = json.loads((out / "conv2spk_75s.json").read_text())
segs = [s for s in conv["segments"] if s["text"]]
speakers = {s["speaker"] for s in segs}
assert len(speakers) == 2, f"conv2spk_75s: {len(speakers)} speakers {sorted(speakers)}"
# Each segment's label against the reference turn its midpoint falls in, best 1:1 mapping.
turns = []
for line in (data / "conv2spk_75s.rttm").read_text().splitlines():
    f = line.split()
    turns.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
def ref(t):
    return next((spk for a, b, spk in turns if a <= t < b), None)
pairs = [(s["speaker"], ref((s["start"] + s["end"]) / 2), s["end"] - s["start"]) for s in segs]
hyp_labels, ref_labels = sorted(speakers), sorted({r for _, r, _ in pairs if r})
best = max(
    sum(d for h, r, d in pairs if r and dict(zip(hyp_labels, perm)).get(h) == r)
    for perm in (ref_labels, ref_labels[::-1])
)
agree = best / sum(d for _, r, d in pairs if r)
assert agree >= 0.9, f"conv2spk_75s: speaker labels agree with the reference turns on {agree:.0%}"
print(f"jfk WER {wer:.1%}; conv2spk_75s: 2 speakers, labels agree with the reference turns on {agree:.0%} of the speech")
EOF
)
log "CLI: $cli_result"
record "CLI result" "$cli_result"

# ---------------------------------------------------------------- 4b. python -m serve ----------
step=serve
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
name=speech-image-check-serve-$$
containers+=("$name")
t0=$(now)
log "serve: python -m serve --port $port in the image (log: $CACHE/logs/serve.log)"
docker_ run -d --name "$name" "${run_opts[@]}" --shm-size=1g "$IMAGE" \
  python -m serve --host 127.0.0.1 --port "$port" >/dev/null
started=
for _ in $(seq 600); do
  if docker_ logs "$name" 2>&1 | grep -q 'speech service listening on'; then started=1; break; fi
  [ "$(docker_ inspect -f '{{.State.Running}}' "$name")" = true ] || break
  sleep 1
done
docker_ logs "$name" >"$CACHE/logs/serve.log" 2>&1
[ -n "$started" ] || { log "python -m serve did not start"; tail -n 40 "$CACHE/logs/serve.log"; exit 1; }
serve_s=$(($(now) - t0))
key=$(sed -n 's/.*created the local admin API key (shown once, keep it): //p' "$CACHE/logs/serve.log" | head -n 1)
[ -n "$key" ] || { log "no API key printed"; exit 1; }
uids=$(docker_ top "$name" -eo pid,uid | awk 'NR > 1 {print $2}' | sort -u | paste -sd ' ')
[ "$uids" = 1000 ] || { log "serve's processes run as uid(s) $uids, not only 1000"; exit 1; }
record "serve start" "$serve_s s (to 'listening'; every process uid 1000)"
# TCP listeners of the container's processes (host network: they show in this machine's table).
pids=$(docker_ top "$name" -eo pid | tail -n +2 | paste -sd '|')
mine=$(ss -Hltnp | grep -E "pid=($pids)," | awk '{print $4}' | sort -u)
loopback=$(grep -cE '^(127\.0\.0\.1|\[::1\]|\[::ffff:127\.0\.0\.1\]):' <<<"$mine" || true)
others=$(grep -vE '^(127\.0\.0\.1|\[::1\]|\[::ffff:127\.0\.0\.1\]):' <<<"$mine" | paste -sd ' ' || true)

step=request
t0=$(now)
api_result=$(.venv/bin/python - "$port" "$key" tests/data <<'EOF'
import json, sys, time
from pathlib import Path
from openai import OpenAI
from speech.evaluation import word_error_rate

port, key, data = sys.argv[1], sys.argv[2], Path(sys.argv[3])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=600, max_retries=0)
t = time.monotonic()
with open(data / "jfk/jfk.flac", "rb") as f:
    text = client.audio.transcriptions.create(file=f, model="whisper-1").text
first = time.monotonic() - t
wer = word_error_rate([(data / "jfk/jfk.txt").read_text()], [text])
assert wer <= 0.05, f"jfk through the API: WER {wer:.3f}: {text!r}"
t = time.monotonic()
with open(data / "conv2spk_75s.flac", "rb") as f:
    raw = client.audio.transcriptions.with_raw_response.create(
        file=f, model="whisper-1", response_format="diarized_json")
second = time.monotonic() - t
speakers = {s["speaker"] for s in json.loads(raw.http_response.text)["segments"] if s["text"]}
assert len(speakers) == 2, f"conv2spk_75s through the API: speakers {sorted(speakers)}"
print(f"jfk {first:.1f} s (WER {wer:.1%}); conv2spk_75s diarized_json {second:.1f} s (2 speakers)")
EOF
) || { docker_ logs "$name" >"$CACHE/logs/serve.log" 2>&1; tail -n 40 "$CACHE/logs/serve.log"; exit 1; }
record "requests (OpenAI client)" "$api_result"

step=serve-stop
t0=$(now)
docker_ stop -t 60 "$name" >/dev/null
docker_ logs "$name" >"$CACHE/logs/serve.log" 2>&1
exit_code=$(docker_ inspect -f '{{.State.ExitCode}}' "$name")
docker_ rm "$name" >/dev/null
record "serve stop" "$(($(now) - t0)) s, exit code $exit_code"
grep -q 'stopping: shutting down Serve and Ray' "$CACHE/logs/serve.log" \
  || { log "python -m serve did not shut down on SIGTERM"; exit 1; }
record "serve's TCP listeners" "$loopback on loopback (HTTP 127.0.0.1:$port); other: ${others:-none}"

[ "$KEEP_IMAGE" = 1 ] || docker_ rmi "$IMAGE" >/dev/null
record "cache disk use" "$(du -sh "$CACHE" | cut -f1) ($CACHE)"
record "total" "$(($(now) - started_at)) s"
step=finished
echo
log "summary ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores)"
printf '%s\n' "${summary[@]}"
log "PASS"
