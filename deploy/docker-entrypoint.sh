#!/bin/sh
# The gateway container's entrypoint: `docker-entrypoint.sh COMMAND...`.
# `docker compose up -d` bind-mounts ./data, which Docker creates root-owned when it is missing,
# while the gateway runs unprivileged. So, started as root (the image's default), take ownership
# of the data directory for the gateway user, then run COMMAND as that user. Started with
# `--user`, it runs COMMAND as that user directly.
set -eu
DATA_DIR=${ER_DATA_DIR:-/data}
RUN_AS=${ER_RUN_AS:-gateway}
if [ "$(id -u)" = 0 ]; then
  uid=$(id -u "$RUN_AS")
  gid=$(id -g "$RUN_AS")
  mkdir -p "$DATA_DIR/logs"
  # Only what is not already the gateway's, so a restart with a large log directory stays fast.
  find "$DATA_DIR" \( ! -user "$uid" -o ! -group "$gid" \) -exec chown -h "$uid:$gid" {} +
  exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@"
fi
exec "$@"
