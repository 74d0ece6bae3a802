# Sourced by test.sh: the system packages some tests drive for real (a headless browser for
# the web page, bubblewrap for the worker's sandbox, mtools, dosfstools and cloud-init for
# orch image), installed with apt-get when missing.
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v bwrap >/dev/null || need+=(bubblewrap)  # the worker under its unit's restrictions
command -v systemd-analyze >/dev/null || need+=(systemd)  # verify and rate the units
command -v setpriv >/dev/null || need+=(util-linux)  # drops capabilities in that sandbox
command -v mcopy >/dev/null || need+=(mtools)  # orch image writes into the boot partition
command -v mkfs.fat >/dev/null || need+=(dosfstools)  # the test image's FAT32, and its fsck
command -v cloud-init >/dev/null || need+=(cloud-init)  # its schema check of user-data
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing ${need[*]} for the tests (apt-get)" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "the tests need: ${need[*]} (Debian package names); install them first" >&2
        exit 1
    fi
fi
