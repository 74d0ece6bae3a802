"""`orch image`, `orch publish` and a node's first boot, on a disk image made here the way
Raspberry Pi OS's is (MBR; a FAT32 boot partition made by mkfs.fat holding config.txt,
cmdline.txt and the stock cloud-init files; a root partition, here random bytes), with the
wheels served by the real `orch publish` server on loopback. The first boot runs
`worker/firstboot.py` against staging roots holding what cloud-init would have written,
with the boot partition's files as a flashed card has them."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orchcore.errors import ImageError
from orchestrator.pi import cloudinit, publish
from orchestrator.pi.image import prepare_image
from orchestrator.pi.mbr import SECTOR, boot_partition, parse_mbr
from orchestrator.pi.publish import MANIFEST, lan_url
from testkit.pipublish import published_wheels
from worker import firstboot
from worker.install import orch_executable
from worker.service import worker_id

MIB = 1 << 20
BOOT_START = 8192  # sectors, as in Raspberry Pi OS's images (4 MiB)
BOOT_MIB = 34  # the smallest FAT32 mkfs.fat makes with 512-byte clusters
ROOT_MIB = 2
TOKEN = "a-cluster-token-for-the-image-tests"
WIFI_PASSWORD = "correct horse battery"
LLAMA_WHEEL = "llama_cpp_python-0.3.36-cp313-cp313-linux_aarch64.whl"
STOCK_USER_DATA = "#cloud-config\n# the image's own example: replaced by orch image\n"

_tools = [t for t in ("mkfs.fat", "fsck.fat", "mcopy", "mtype") if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(bool(_tools), reason=f"missing {', '.join(_tools)} "
                                "(scripts/test-deps.sh installs mtools and dosfstools)")
MTOOLS = dict(os.environ, MTOOLS_SKIP_CHECK="1")


def _mbr_entry(type_id: int, start: int, sectors: int) -> bytes:
    return (bytes([0, 0, 0, 0, type_id, 0, 0, 0]) + start.to_bytes(4, "little")
            + sectors.to_bytes(4, "little"))


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    """The stand-in for the downloaded .img: random bytes everywhere but the boot
    partition, so any stray write shows."""
    folder = tmp_path_factory.mktemp("official")
    fat = folder / "boot.fat"
    subprocess.run(["mkfs.fat", "-F", "32", "-n", "BOOTFS", "-C", str(fat),
                    str(BOOT_MIB * 1024)], check=True, capture_output=True)
    for name, text in {"config.txt": "arm_64bit=1\n", "cmdline.txt": "console=tty1 root=...\n",
                       "user-data": STOCK_USER_DATA, "network-config": "# stock\n",
                       "meta-data": "# stock\n"}.items():
        (folder / name).write_text(text)
        subprocess.run(["mcopy", "-i", str(fat), str(folder / name), f"::{name}"], check=True,
                       env=MTOOLS)
    boot_sectors = BOOT_MIB * MIB // SECTOR
    root_start = BOOT_START + boot_sectors
    mbr = bytearray(os.urandom(446)) + _mbr_entry(0x0C, BOOT_START, boot_sectors) + \
        _mbr_entry(0x83, root_start, ROOT_MIB * MIB // SECTOR) + bytes(32) + b"\x55\xaa"
    image = folder / "raspios-lite-arm64.img"
    with image.open("wb") as out:
        out.write(mbr)
        out.write(os.urandom(BOOT_START * SECTOR - SECTOR))
        out.write(fat.read_bytes())
        out.write(os.urandom(ROOT_MIB * MIB))
    return image


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """`orch publish`'s folder served on loopback under a LAN-like name (testkit/pipublish):
    orch's wheel built from this checkout, and a stand-in for the arm64 llama-cpp-python
    wheel (random bytes under its name: it is fetched and checked here, never installed)."""
    extra = tmp_path_factory.mktemp("arm64") / LLAMA_WHEEL
    extra.write_bytes(os.urandom(4096))
    with published_wheels(tmp_path_factory.mktemp("publish"), [extra.parent],
                          build_orch=True) as wheels:
        yield wheels


@pytest.fixture(scope="module")
def published(served) -> str:
    return served[0]


@pytest.fixture(autouse=True)
def reach_published(served, monkeypatch) -> None:
    """This process and the commands it starts reach the published wheels by their name."""
    for name, value in served[1].items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("secrets")
    for name, text in {"token.txt": TOKEN + "\n", "wifi.txt": WIFI_PASSWORD + "\n"}.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o600)
    (folder / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me@laptop\n")
    return folder


def orch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="200"))


def make_node_image(official: Path, out: Path, url: str, secrets: Path, *extra: str
                    ) -> subprocess.CompletedProcess[str]:
    return orch("image", str(official), "-o", str(out), "--token-file",
                str(secrets / "token.txt"), "--wheels-url", url, *extra)


@pytest.fixture(scope="module")
def node_image(official, served, secrets_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("node") / "node.img"
    with pytest.MonkeyPatch.context() as env:
        for name, value in served[1].items():
            env.setenv(name, value)
        done = make_node_image(official, out, served[0], secrets_dir,
                               "--wifi-ssid", "home net", "--wifi-password-file",
                               str(secrets_dir / "wifi.txt"), "--wifi-country", "GB",
                               "--ssh-key", str(secrets_dir / "id_ed25519.pub"))
    assert done.returncode == 0, done.stderr
    assert "(mode 0600: it holds the cluster token)" in done.stdout, done.stdout
    assert "note: the cluster token is in orch-token on the FAT boot partition" in \
        done.stdout and "first boot, which moves it to a root-only file" in done.stdout
    return out


def boot_of(image: Path) -> tuple[int, int]:
    with image.open("rb") as f:
        part = boot_partition(parse_mbr(f.read(SECTOR)), image.stat().st_size)
    return part.offset, part.end


def fat_file(image: Path, name: str) -> str:
    offset = boot_of(image)[0]
    return subprocess.run(["mtype", "-i", f"{image}@@{offset}", f"::{name}"], check=True,
                          capture_output=True, text=True, env=MTOOLS).stdout


def assert_same_outside_boot(official: Path, node: Path) -> None:
    start, end = boot_of(official)
    a, b = official.read_bytes(), node.read_bytes()
    assert len(a) == len(b)
    assert a[:start] == b[:start], "bytes before the boot partition changed"
    assert a[end:] == b[end:], "bytes after the boot partition changed"
    assert a[start:end] != b[start:end]


def test_the_mbr_is_read_and_foreign_tables_are_refused(official):
    parts = parse_mbr(official.read_bytes()[:SECTOR])
    assert [(p.number, p.type_id, p.start_sector) for p in parts] == \
        [(1, 0x0C, BOOT_START), (2, 0x83, BOOT_START + BOOT_MIB * MIB // SECTOR)]
    assert boot_partition(parts, official.stat().st_size).size == BOOT_MIB * MIB
    with pytest.raises(ImageError, match="no MBR"):
        parse_mbr(bytes(SECTOR))
    gpt = bytes(446) + _mbr_entry(0xEE, 1, 100) + bytes(48) + b"\x55\xaa"
    with pytest.raises(ImageError, match="GPT"):
        parse_mbr(gpt)
    with pytest.raises(ImageError, match="cut short"):
        boot_partition(parts, BOOT_START * SECTOR + MIB)


def test_the_files_are_in_the_boot_partition_and_nothing_else_changed(official, node_image,
                                                                     published):
    assert_same_outside_boot(official, node_image)
    assert stat.S_IMODE(node_image.stat().st_mode) == 0o600, "the image holds the token"
    user_data = fat_file(node_image, "user-data")
    assert user_data.startswith("#cloud-config\n") and user_data != STOCK_USER_DATA
    config = yaml.safe_load(user_data)
    assert config["users"][0]["name"] == "orch"
    assert config["users"][0]["ssh_authorized_keys"] == \
        ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me@laptop"]
    scripts = {f["path"]: f["content"] for f in config["write_files"]}
    assert scripts[cloudinit.FIRSTBOOT_SCRIPT] == Path(firstboot.__file__).read_text()
    pins = firstboot.Config.read_text(scripts[cloudinit.FIRSTBOOT_CONFIG])
    served = {f["name"]: f["sha256"] for f in json.loads(_get(published + MANIFEST))["files"]}
    assert pins.files == served and LLAMA_WHEEL in served
    assert "cmake" not in config["packages"]  # the arm64 wheel is published: no build
    network = yaml.safe_load(fat_file(node_image, "network-config"))["network"]
    assert network["version"] == 2
    assert network["wifis"]["wlan0"]["access-points"]["home net"]["password"] == WIFI_PASSWORD
    meta = yaml.safe_load(fat_file(node_image, "meta-data"))
    assert set(meta) == {"instance-id"}  # no local-hostname: clones name themselves
    assert fat_file(node_image, cloudinit.TOKEN_FILE) == TOKEN + "\n"
    assert fat_file(node_image, "config.txt") == "arm_64bit=1\n"
    start, end = boot_of(node_image)
    fat = node_image.parent / "boot-check.fat"
    fat.write_bytes(node_image.read_bytes()[start:end])
    check = subprocess.run(["fsck.fat", "-n", str(fat)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


def test_an_xz_image_is_decompressed_as_it_streams(official, published, tmp_path):
    packed = tmp_path / "raspios.img.xz"
    with official.open("rb") as src, lzma.open(packed, "wb", preset=0) as dst:
        shutil.copyfileobj(src, dst, MIB)
    seed = cloudinit.NodeSeed(published, (cloudinit.PinnedWheel(
        "orch_cluster-0.1.0-py3-none-any.whl", "0" * 64, 1),), "llama-cpp-python==0.3.36",
        "print()\n")
    out = tmp_path / "node.img"
    prepare_image(packed, out, cloudinit.boot_files(seed, TOKEN), progress=False)
    assert_same_outside_boot(official, out)
    assert fat_file(out, "user-data") == cloudinit.render_user_data(seed)
    assert "cmake" in yaml.safe_load(fat_file(out, "user-data"))["packages"]  # built on the Pi
    assert not list(tmp_path.glob(".*.part"))
    packed.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(ImageError, match="not a whole xz file"):
        prepare_image(packed, tmp_path / "cut.img", {}, progress=False)
    assert not (tmp_path / "cut.img").exists() and not list(tmp_path.glob(".*.part"))


@pytest.mark.parametrize("which", ["token.txt", "wifi.txt"])
def test_a_secret_file_others_may_read_is_refused(official, published, secrets_dir, tmp_path,
                                                  which):
    loose = tmp_path / "secrets"
    shutil.copytree(secrets_dir, loose)
    (loose / which).chmod(0o640)
    out = tmp_path / "node.img"
    done = make_node_image(official, out, published, loose, "--wifi-ssid", "home",
                           "--wifi-password-file", str(loose / "wifi.txt"),
                           "--wifi-country", "GB")
    assert done.returncode == 1
    assert f"{loose / which} may be read by other users (mode 0640): chmod 600" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_user_data_passes_cloud_inits_own_schema_check(node_image, tmp_path):
    if shutil.which("cloud-init") is None:
        pytest.skip("Debian's cloud-init is not installed (scripts/test-deps.sh installs it)")
    good = tmp_path / "user-data"
    good.write_text(fat_file(node_image, "user-data"))
    done = subprocess.run(["cloud-init", "schema", "--config-file", str(good)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "bad-user-data"  # the check is live: a wrong type fails it
    bad.write_text(good.read_text().replace("ssh_pwauth: false", "ssh_pwauth: [1]"))
    assert subprocess.run(["cloud-init", "schema", "--config-file", str(bad)],
                          capture_output=True, text=True, timeout=60).returncode != 0


def test_network_config_has_wifi_only_when_given():
    wheels = (cloudinit.PinnedWheel("orch_cluster-0.1.0-py3-none-any.whl", "0" * 64, 1),)
    wired = cloudinit.NodeSeed("http://pc:8765/", wheels, "llama-cpp-python==0.3.36", "")
    assert yaml.safe_load(cloudinit.render_network_config(wired)) == {"network": {
        "version": 2, "renderer": "NetworkManager",
        "ethernets": {"eth0": {"dhcp4": True, "optional": True}}}}
    with pytest.raises(ImageError, match="--wifi-country"):
        cloudinit.Wifi("home", "password123", "uk")
    with pytest.raises(ImageError, match="no orch_cluster wheel"):
        cloudinit.NodeSeed("http://pc:8765/", (), "llama-cpp-python==0.3.36", "")


def boot_as_a_card(node_image: Path, root: Path) -> Path:
    """``root`` as cloud-init leaves it before orch-firstboot starts: its write_files
    written, the boot partition's files at /boot/firmware."""
    boot = root / "boot" / "firmware"
    boot.mkdir(parents=True)
    offset = boot_of(node_image)[0]
    subprocess.run(["mcopy", "-s", "-i", f"{node_image}@@{offset}", "::*", str(boot)],
                   check=True, env=MTOOLS, capture_output=True)
    (root / "etc").mkdir()
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\traspberrypi\n")
    for entry in yaml.safe_load((boot / "user-data").read_text())["write_files"]:
        path = root / entry["path"].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(entry["content"])
        path.chmod(int(entry["permissions"], 8))
    return boot


def test_two_first_boots_from_one_image_make_two_nodes(node_image, tmp_path):
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl is not installed (scripts/test-deps.sh installs systemd)")
    names, ids = [], []
    for card in ("card1", "card2"):
        root = tmp_path / card
        boot = boot_as_a_card(node_image, root)
        script = root / cloudinit.FIRSTBOOT_SCRIPT.lstrip("/")
        command = [sys.executable, str(script), "--root", str(root), "--boot", str(boot)]
        if card == "card1":  # a first try that fails half-way (the unit tries again)
            failed = subprocess.run([*command, "--orch", str(root / "no-orch")],
                                    capture_output=True, text=True, timeout=120)
            assert failed.returncode == 1 and "cannot install the worker service" in \
                failed.stdout, failed.stdout + failed.stderr
            assert not (boot / cloudinit.TOKEN_FILE).exists()  # off the FAT at once
        done = subprocess.run([*command, "--orch", orch_executable()],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        env = root / "etc/orch/worker.env"
        assert env.stat().st_mode & 0o777 == 0o600
        assert f"ORCH_WORKER_TOKEN={TOKEN}\n" in env.read_text()
        unit = root / "etc/systemd/system/orch-worker.service"
        wants = root / "etc/systemd/system/multi-user.target.wants/orch-worker.service"
        assert unit.is_file() and wants.is_symlink()
        assert os.readlink(wants) == "/etc/systemd/system/orch-worker.service"
        # The secrets are off the FAT partition; what is root's stays root's.
        assert not (boot / cloudinit.TOKEN_FILE).exists()
        assert WIFI_PASSWORD not in (boot / "network-config").read_text()
        assert TOKEN not in "".join(p.read_text() for p in boot.iterdir() if p.is_file())
        assert "config: disabled" in (root / firstboot.KEEP_NETWORK).read_text()
        assert not (root / firstboot.STATE_DIR / "token").exists()
        name = (root / "etc/hostname").read_text().strip()
        assert f"127.0.1.1\t{name}" in (root / "etc/hosts").read_text()
        names.append(name)
        # Nothing in the image or the first boot fixes the worker id: the worker makes it
        # at its first start, in its state folder.
        assert not (root / "var/lib/orch").exists()
        ids.append(worker_id(root / "var/lib/orch"))
        again = subprocess.run(done.args, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "already done" in again.stdout, again.stdout
        assert (root / "etc/hostname").read_text().strip() == name
    assert names[0] != names[1] and all(n.startswith("orch-") for n in names)
    assert ids[0] != ids[1]


def test_first_boot_fetches_only_the_pinned_wheels(node_image, published, tmp_path):
    config_text = {f["path"]: f["content"] for f in yaml.safe_load(
        fat_file(node_image, "user-data"))["write_files"]}[cloudinit.FIRSTBOOT_CONFIG]
    pins = firstboot.Config.read_text(config_text)
    got = firstboot.fetch_wheels(pins, tmp_path / "wheels")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in got} == pins.files
    tampered = firstboot.Config(pins.wheels_url, {**pins.files, LLAMA_WHEEL: "1" * 64},
                                pins.llama_requirement)
    (tmp_path / "wheels" / LLAMA_WHEEL).unlink()
    with pytest.raises(firstboot.FirstBootError, match="not the wheel the image was made for"):
        firstboot.fetch_wheels(tampered, tmp_path / "wheels")
    assert not (tmp_path / "wheels" / LLAMA_WHEEL).exists()


def test_orch_image_needs_publish_running_and_says_so(official, secrets_dir, tmp_path,
                                                      monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY"):  # the name leads to a closed port
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    done = make_node_image(official, tmp_path / "node.img", "http://wheels.orch.test:9/",
                           secrets_dir)
    assert done.returncode == 1 and "start `orch publish`" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_a_loopback_wheels_url_is_refused_with_the_lan_address(official, secrets_dir,
                                                               tmp_path, host):
    done = make_node_image(official, tmp_path / "node.img", f"http://{host}:8765/",
                           secrets_dir)
    assert done.returncode == 1, done.stderr
    message = done.stderr.replace("\n", "")
    assert "is loopback: a Pi reaches itself there" in message, message
    lan = lan_url(8765)
    assert (f"--wheels-url {lan}" if lan else "no LAN address") in message, message
    assert not (tmp_path / "node.img").exists() and "Traceback" not in message


def test_boot_dir_writes_a_flashed_cards_boot_folder(published, secrets_dir, tmp_path):
    card = tmp_path / "bootfs"
    card.mkdir()
    (card / "config.txt").write_text("arm_64bit=1\n")
    done = orch("image", "--boot-dir", str(card), "--token-file",
                str(secrets_dir / "token.txt"), "--wheels-url", published, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"] == sorted(
        ["meta-data", "network-config", cloudinit.TOKEN_FILE, "user-data"])
    assert (card / cloudinit.TOKEN_FILE).read_text() == TOKEN + "\n"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in card.iterdir()
             if p.name != "config.txt"}
    assert modes == dict.fromkeys(modes, 0o600), f"made readable by others: {modes}"
    assert "FAT boot partition" in json.loads(done.stdout)["token_note"]
    assert "wifis" not in yaml.safe_load((card / "network-config").read_text())["network"]
    elsewhere = orch("image", "--boot-dir", str(tmp_path), "--token-file",
                     str(secrets_dir / "token.txt"), "--wheels-url", published)
    assert elsewhere.returncode == 1 and "does not look like a Raspberry Pi boot" in \
        elsewhere.stderr


def test_orch_publish_serves_the_wheels_and_their_list(tmp_path):
    wheel = tmp_path / "orch_cluster-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"orch's wheel")
    extra = tmp_path / "arm64"
    extra.mkdir()
    (extra / LLAMA_WHEEL).write_bytes(b"an arm64 build")
    server = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "publish", "--host", "127.0.0.1", "--port",
         "0", "--orch-wheel", str(wheel), "--wheels", str(extra), "--folder",
         str(tmp_path / "served")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), server.stderr.read() if server.stderr \
            else url
        listed = json.loads(_get(url + MANIFEST))["files"]
        assert {f["name"]: f["sha256"] for f in listed} == {
            wheel.name: hashlib.sha256(b"orch's wheel").hexdigest(),
            LLAMA_WHEEL: hashlib.sha256(b"an arm64 build").hexdigest()}
        assert _get(url + LLAMA_WHEEL) == "an arm64 build"
    finally:
        server.terminate()
        _, err = server.communicate(timeout=10)
    said = err.replace("\n", " ")
    assert "is loopback: a Pi cannot fetch from it, and orch image refuses it" in said, err
    assert "--host 0.0.0.0" in said and "next: orch image" not in said, err


def test_a_first_boot_download_leaves_no_proxy_behind(monkeypatch, tmp_path):
    """Our fetches (a Pi's first boot, orch image's manifest check, the one HTTP fetcher)
    used urlopen's shared opener, which keeps the proxy settings of its first use: in one
    process (the test suite) every later fetch went to that proxy."""
    import urllib.request

    from orchcore.errors import SourceFetchError
    from orchcore.rangefetch import describe_url
    from testkit.httpserver import serve

    monkeypatch.setattr(urllib.request, "_opener", None)  # as in a fresh process
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)  # this module's fixtures set some
    with serve({"w.whl": b"abc"}) as server:
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
        with pytest.raises(firstboot.FirstBootError):
            firstboot._download(server.url("w.whl"), tmp_path / "w.whl", "0" * 64)
        with pytest.raises(publish.PublishError):  # orch image's manifest check, in process
            publish.fetch_manifest(server.url(""))
        with pytest.raises(SourceFetchError):  # the one HTTP fetcher
            describe_url(server.url("w.whl"), "test")
        assert urllib.request._opener is None, "a shared opener keeps this proxy for good"
        monkeypatch.delenv("http_proxy")
        with urllib.request.urlopen(server.url("w.whl"), timeout=10) as answer:
            assert answer.read() == b"abc", "a later fetch still went to the proxy"
