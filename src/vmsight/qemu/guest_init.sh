#!/bin/busybox sh
# vmsight test-guest init (busybox initramfs). Runs the guest agent on /dev/ttyS1:
#   host -> guest:  RUN <id> <root> <timeout_s> <base64 command>      root: "-" (initramfs) or "host" (9p chroot)
#                   PING <id>
#   guest -> host:  PONG <id> | BEGIN <id> / base64 stdout / STDERR <id> / base64 stderr / END <id> <rc>
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp /run /mnt /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs shm /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
hostname vmsight-guest
echo "vmsight-init: $(uname -r) up $(cut -d' ' -f1 /proc/uptime)s" > /dev/console

if grep -q 'vmsight.hostroot' /proc/cmdline; then
  # The host's / read-only over 9p, writable through a tmpfs overlay, for tests that run host Python in the guest.
  mkdir -p /mnt/host /mnt/rw /hostroot
  if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /mnt/host; then
    mount -t tmpfs -o size=80% rw /mnt/rw && mkdir -p /mnt/rw/upper /mnt/rw/work
    mount -t overlay overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /hostroot
    for d in proc sys dev dev/pts dev/shm; do mount --bind /$d /hostroot/$d; done
    mount -t tmpfs tmpfs /hostroot/run
  else
    echo "vmsight-init: cannot mount the host root (kernel needs NET_9P_VIRTIO, 9P_FS, OVERLAY_FS)" > /dev/console
  fi
fi

agent() {
  stty -F /dev/ttyS1 raw -echo 2>/dev/null
  exec 3<>/dev/ttyS1
  echo "READY" >&3
  while IFS=' ' read -r verb id root tmo cmd <&3; do
    case "$verb" in
      PING) echo "PONG $id" >&3 ;;
      RUN)
        # a request sent again after an agent restart (the host resends on READY): run it once
        last=; read -r last < /tmp/.agent.last 2>/dev/null
        if [ "$id" = "$last" ]; then continue; fi
        echo "$id" > /tmp/.agent.last
        echo "$cmd" | base64 -d > /tmp/.cmd.$id
        if [ "$root" = host ]; then
          timeout -s KILL "$tmo" chroot /hostroot /bin/sh /tmp/.cmd.$id </dev/null >/tmp/.out.$id 2>/tmp/.err.$id
        else
          timeout -s KILL "$tmo" /bin/sh /tmp/.cmd.$id </dev/null >/tmp/.out.$id 2>/tmp/.err.$id
        fi
        rc=$?
        { echo "BEGIN $id"; base64 /tmp/.out.$id; echo "STDERR $id"; base64 /tmp/.err.$id; echo "END $id $rc"; } >&3
        rm -f /tmp/.cmd.$id /tmp/.out.$id /tmp/.err.$id
        ;;
    esac
  done
}

# The chroot reads the script from the overlay's /tmp, so keep /tmp shared: bind it after the agent writes there.
[ -d /hostroot/tmp ] && mount --bind /tmp /hostroot/tmp
# The agent runs in a child process, not as PID 1: orphaned background jobs (a command's `prog &`) are
# reparented to PID 1, and their SIGCHLD interrupted busybox `read` (it polls and fails on EINTR), which
# ended the loop and lost any request that arrived while the agent restarted.
while true; do (agent); sleep 0.2; done
