#!/bin/sh
# Entrypoint of the flow service (docker/compose.yaml): the streamrec flow with Bytewax
# recovery in a directory on a volume, initialised on the first start only, so every
# restart resumes from the last snapshot (Kafka offsets included) instead of re-reading
# its input topics from `start`.
#
# Variables: FLOW (the bytewax.run import string), RECOVERY_DIR (default
# /data/recovery), RECOVERY_PARTITIONS (one per process; default 1), SNAPSHOT_S
# (snapshot interval, whole seconds; default 10), BACKUP_S (how long superseded
# snapshots are kept, s; default 60).
set -eu
FLOW="${FLOW:-flows.recsys:build('/app/docker/streamrec.toml')}"
RECOVERY_DIR="${RECOVERY_DIR:-/data/recovery}"
RECOVERY_PARTITIONS="${RECOVERY_PARTITIONS:-1}"
SNAPSHOT_S="${SNAPSHOT_S:-10}"
BACKUP_S="${BACKUP_S:-60}"

mkdir -p "$RECOVERY_DIR"
if [ ! -e "$RECOVERY_DIR/part-0.sqlite3" ]; then
    echo "run-flow: initialising recovery in $RECOVERY_DIR ($RECOVERY_PARTITIONS partitions)" >&2
    python -m bytewax.recovery "$RECOVERY_DIR" "$RECOVERY_PARTITIONS"
else
    echo "run-flow: resuming from the recovery snapshots in $RECOVERY_DIR" >&2
fi
exec python -m bytewax.run "$FLOW" -r "$RECOVERY_DIR" -s "$SNAPSHOT_S" -b "$BACKUP_S"
