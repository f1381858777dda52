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
  # chown -R -h walks the tree without following symlinks (GNU fts, physical walk), so a link
  # placed in the bind mount cannot lead root's chown outside it.
  chown -R -h "$uid:$gid" "$DATA_DIR"
  exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@"
fi
exec "$@"
