#!/bin/busybox sh
# vmsight test-guest init (busybox initramfs). Runs the guest agent on /dev/ttyS1:
#   host -> guest:  RUN <id> <root> <timeout_s> <len> <sha256> <base64 command>   root: "-" (initramfs) or "host"
#                   (9p chroot); len = the base64's length, sha256 = of "<id> <root> <timeout_s> <base64 command>"
#                   PING <id>
#   guest -> host:  PONG <id> | BAD <id> (damaged: not run) | BEGIN <id> / base64 stdout / STDERR <id> / base64 stderr / END <id> <rc>
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp /run /mnt /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs shm /dev/shm
mount -t tmpfs tmpfs /tmp
# The agent's own files live in the guest's /run, which both roots share (the host root gets it bound below).
mount -t tmpfs -o mode=0755 run /run && mkdir -m 0700 /run/vmsight-agent
A=/run/vmsight-agent
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
hostname vmsight-guest
echo "vmsight-init: $(uname -r) up $(cut -d' ' -f1 /proc/uptime)s" > /dev/console

if grep -q 'vmsight.hostroot' /proc/cmdline; then
  # The host's / read-only over 9p, writable through a tmpfs overlay (writes stay in the guest), for tests that
  # run host Python in the guest. The guest mounts only its own /proc, /sys, /dev and /run over it: every other
  # host path (/tmp, where checkouts and CI clones often live) is seen as it is on the host.
  mkdir -p /mnt/host /mnt/rw /hostroot
  if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /mnt/host; then
    mount -t tmpfs -o size=80% rw /mnt/rw && mkdir -p /mnt/rw/upper /mnt/rw/work
    mount -t overlay overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /hostroot
    for d in proc sys dev dev/pts dev/shm run; do mount --bind /$d /hostroot/$d; done
    # Host directories shared at their own path (LaunchConfig.host_dirs, one per line, tag hostdirN), mounted
    # last so that they are seen even below the guest's own /run or /dev; read-only with an overlay, as /.
    i=0
    [ -f /etc/vmsight-hostdirs ] && while IFS= read -r dir; do
      m=/mnt/hostdir$i
      mkdir -p $m/ro $m/upper "/hostroot$dir"
      if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostdir$i $m/ro; then
        mount -t tmpfs -o size=20% rw$i $m/upper && mkdir -p $m/upper/u $m/upper/w
        mount -t overlay overlay -o "lowerdir=$m/ro,upperdir=$m/upper/u,workdir=$m/upper/w" "/hostroot$dir" ||
          echo "vmsight-init: cannot mount host directory $i" > /dev/console
      else
        echo "vmsight-init: cannot mount host directory $i (9p tag hostdir$i)" > /dev/console
      fi
      i=$((i + 1))
    done < /etc/vmsight-hostdirs
  else
    echo "vmsight-init: cannot mount the host root (kernel needs NET_9P_VIRTIO, 9P_FS, OVERLAY_FS)" > /dev/console
  fi
fi

agent() {
  stty -F /dev/ttyS1 raw -echo 2>/dev/null
  exec 3<>/dev/ttyS1
  echo "READY" >&3
  while IFS=' ' read -r verb id root tmo len sum cmd <&3; do
    case "$verb" in
      PING) echo "PONG $id" >&3 ;;
      RUN)
        # framed: a request cut short or glued to another's tail never runs (see agent.py frame_request)
        got=$(printf '%s %s %s %s' "$id" "$root" "$tmo" "$cmd" | sha256sum)
        if [ "${#cmd}" != "$len" ] || [ "${got%% *}" != "$sum" ]; then echo "BAD $id" >&3; continue; fi
        # a request sent again after an agent restart (the host resends on READY): run it once
        last=; read -r last < $A/last 2>/dev/null
        if [ "$id" = "$last" ]; then continue; fi
        echo "$id" > $A/last
        echo "$cmd" | base64 -d > $A/cmd.$id
        if [ "$root" = host ]; then
          timeout -s KILL "$tmo" chroot /hostroot /bin/sh $A/cmd.$id </dev/null >$A/out.$id 2>$A/err.$id
        else
          timeout -s KILL "$tmo" /bin/sh $A/cmd.$id </dev/null >$A/out.$id 2>$A/err.$id
        fi
        rc=$?
        { echo "BEGIN $id"; base64 $A/out.$id; echo "STDERR $id"; base64 $A/err.$id; echo "END $id $rc"; } >&3
        rm -f $A/cmd.$id $A/out.$id $A/err.$id
        ;;
    esac
  done
}

# The agent runs in a child process, not as PID 1: orphaned background jobs (a command's `prog &`) are
# reparented to PID 1, and their SIGCHLD interrupted busybox `read` (it polls and fails on EINTR), which
# ended the loop and lost any request that arrived while the agent restarted.
while true; do (agent); sleep 0.2; done
