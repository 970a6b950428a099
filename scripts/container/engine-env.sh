# Sourced by scripts/build-image's helpers and scripts/test-container: the cache folder and
# a containers.conf for podman/buildah on hosts without systemd or CAP_SYS_RESOURCE.
#
# A CONTAINERS_CONF set by the caller is kept as it is. Otherwise the file is
# $CACHE_DIR/containers.conf, written from scripts/container/containers.conf.in by
# `write_containers_conf IMAGE`: default_ulimits must not ask for more than the engine
# process itself may grant (runc: "error setting rlimit type 6/7: operation not
# permitted"), so nofile is `ulimit -Hn` and nproc the largest of `ulimit -Hu`, 32768, 16384,
# 4096 that a container of IMAGE starts with.

CACHE_DIR=${CACHE_DIR:-${NNUNET_BENTO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nnunet-bento}}
export CACHE_DIR
_conf_template="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/containers.conf.in"
# Ours when unset or when it is our file (a script sourced from one that sourced this).
if [ -z "${CONTAINERS_CONF:-}" ] || [ "$CONTAINERS_CONF" = "$CACHE_DIR/containers.conf" ]; then
  NNUNET_BENTO_OWN_CONF=1
  export CONTAINERS_CONF="$CACHE_DIR/containers.conf"
  if [ ! -s "$CONTAINERS_CONF" ]; then
    # Until write_containers_conf has probed nproc: nofile only needs `ulimit -Hn`.
    mkdir -p "$CACHE_DIR"
    sed -e "s/@NOFILE@/$(ulimit -Hn)/g" -e "s/@NPROC@/4096/g" "$_conf_template" >"$CONTAINERS_CONF"
  fi
fi

# write_containers_conf IMAGE: probe the nproc ceiling with IMAGE and write CONTAINERS_CONF
# (only the file this script owns; a caller's CONTAINERS_CONF is left alone).
write_containers_conf() {
  [ "${NNUNET_BENTO_OWN_CONF:-0}" = 1 ] || return 0
  grep -q '^# probed' "$CONTAINERS_CONF" 2>/dev/null && return 0
  local image=$1 nofile nproc candidate hard
  nofile=$(ulimit -Hn)
  [ "$nofile" = unlimited ] && nofile=1048576
  hard=$(ulimit -Hu)
  [ "$hard" = unlimited ] && hard=1048576
  nproc=
  for candidate in "$hard" 32768 16384 4096; do
    [ "$candidate" -le "$hard" ] || continue
    if podman run --rm --network none --ulimit "nofile=$nofile:$nofile" \
      --ulimit "nproc=$candidate:$candidate" --entrypoint /bin/true "$image" >/dev/null 2>&1; then
      nproc=$candidate
      break
    fi
  done
  if [ -z "$nproc" ]; then
    echo "no nproc limit up to $hard lets a container of $image start:" >&2
    podman run --rm --network none --entrypoint /bin/true "$image" >&2 || true
    return 1
  fi
  { echo "# probed: nofile $nofile, nproc $nproc"; sed -e "s/@NOFILE@/$nofile/g" -e "s/@NPROC@/$nproc/g" "$_conf_template"; } >"$CONTAINERS_CONF.tmp"
  mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"
  echo "containers.conf: $CONTAINERS_CONF (nofile $nofile, nproc $nproc)" >&2
}
