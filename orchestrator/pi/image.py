"""``orch image``: a copy of an official Raspberry Pi image (or a flashed card's mounted boot
folder) given the first-boot files of ``orchestrator/pi/cloudinit.py``.

The image is copied (``.img.xz`` decompressed as it streams, runs of zeros left as holes),
then the files are written into its FAT boot partition with mtools (``mcopy -i
IMAGE@@OFFSET``): no root, no loop mount, and no byte outside the boot partition changes.
The copy is made under a temporary name and renamed when complete, so a cut run never
leaves a half image under the name asked for. Secrets (the cluster token, the Wi-Fi
password) come from files only, refused when others may read them.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import IO

from orchcore.errors import ImageError
from orchestrator.models.transfer import CHUNK, progress_bar
from orchestrator.pi.mbr import SECTOR, Partition, boot_partition, parse_mbr

_ZEROS = bytes(CHUNK)
_XZ_MAGIC = b"\xfd7zXZ\x00"
# A boot partition has these; a folder without any of them is not one.
_BOOT_MARKERS = ("config.txt", "cmdline.txt", "start4.elf", "bootcode.bin")


def read_secret(path: Path, what: str) -> str:
    """The first line of a secret file, refused if group or others may read it."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise ImageError(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(f"cannot read {what} file {path}: {exc}") from None
    if mode & 0o077:
        raise ImageError(f"{what} file {path} may be read by other users (mode "
                         f"{stat.S_IMODE(mode):04o}): chmod 600 {path}, and consider the "
                         f"secret seen if others share this machine")
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ImageError(f"{what} file {path} is empty: put the {what} on its first line")
    return lines[0].strip()


def write_private(path: Path, text: str) -> None:
    """A new file readable by its owner only, from its creation on (mode 0600, where the
    file system has modes)."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)


def read_ssh_keys(path: Path) -> tuple[str, ...]:
    """The public keys in an authorized_keys-style file (refusing a private key)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(f"cannot read SSH key file {path}: {exc}") from None
    if "PRIVATE KEY" in text:
        raise ImageError(f"{path} is a private key: give the public one ({path}.pub)")
    keys = tuple(line.strip() for line in text.splitlines()
                 if line.strip() and not line.lstrip().startswith("#"))
    if not keys or not all(k.startswith(("ssh-", "ecdsa-", "sk-")) for k in keys):
        raise ImageError(f"{path} holds no SSH public key (lines like 'ssh-ed25519 AAAA... "
                         f"you@laptop')")
    return keys


def is_xz(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(_XZ_MAGIC)) == _XZ_MAGIC


def prepare_image(source: Path, out: Path, files: Mapping[str, str], *,
                  progress: bool = True) -> Partition:
    """Copy ``source`` (``.img`` or ``.img.xz``) to ``out`` and write ``files`` into its
    boot partition. Returns that partition."""
    mcopy = _mcopy()
    if not source.is_file():
        raise ImageError(f"{source} does not exist: download the Raspberry Pi OS Lite "
                         f"(64-bit) image first (docs/raspberry-pi.md)")
    if out.exists() and out.resolve() == source.resolve():
        raise ImageError(f"-o {out} is the image itself: write the node's image to a new file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    except OSError as exc:
        raise ImageError(f"cannot write -o {out} ({exc.strerror}): give a file in a folder "
                         f"you may write to, then flash that file to the cards") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as dest:
            copy_image(source, dest, progress=progress)
        partition = _boot_partition_of(tmp, str(source))
        write_into_image(tmp, partition, files, mcopy)
        os.replace(tmp, out)  # mode 0600 from mkstemp on: the image holds the token
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"cannot write {out}: {exc.strerror} (the node image needs as much "
                         f"free disk as the decompressed image, about 3 GiB)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return partition


def copy_image(source: Path, dest: IO[bytes], *, progress: bool) -> int:
    """Stream ``source`` (decompressed if xz) into ``dest``; zeros become holes. Returns the
    image's size."""
    total = source.stat().st_size
    compressed = is_xz(source)
    label = f"{'decompressing' if compressed else 'copying'} {source.name}"
    written = 0
    with source.open("rb") as raw, progress_bar(progress) as bar, \
            (lzma.open(raw) if compressed else nullcontext(raw)) as reader:
        task = bar.add_task(label, total=total) if bar else None
        try:
            while chunk := reader.read(CHUNK):
                if chunk == _ZEROS[:len(chunk)]:
                    dest.seek(len(chunk), os.SEEK_CUR)
                else:
                    dest.write(chunk)
                written += len(chunk)
                if bar is not None and task is not None:
                    bar.update(task, completed=raw.tell())
        except (lzma.LZMAError, EOFError) as exc:
            raise ImageError(f"{source} is not a whole xz file ({exc}): download it "
                             f"again") from None
        dest.truncate(written)
    return written


def _boot_partition_of(image: Path, name: str) -> Partition:
    with image.open("rb") as f:
        first = f.read(SECTOR)
    return boot_partition(parse_mbr(first, name), image.stat().st_size, name)


def write_into_image(image: Path, partition: Partition, files: Mapping[str, str],
                     mcopy: str | None = None) -> None:
    """Write ``files`` at the top of the FAT file system at ``partition`` (replacing files
    of the same names) with mtools' mcopy."""
    mcopy = mcopy or _mcopy()
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    with tempfile.TemporaryDirectory(prefix="orch-image-") as staging:
        for name, text in files.items():
            local = Path(staging) / name
            write_private(local, text)
            command = [mcopy, "-o", "-i", f"{image}@@{partition.offset}", str(local),
                       f"::{name}"]
            done = subprocess.run(command, capture_output=True, text=True, env=env,
                                  check=False)
            if done.returncode != 0:
                raise ImageError(f"mcopy could not write {name} into the boot partition of "
                                 f"{image} (partition {partition.number} at byte "
                                 f"{partition.offset}): {(done.stderr or done.stdout).strip()}")


def write_into_folder(folder: Path, files: Mapping[str, str]) -> None:
    """Write ``files`` into a flashed card's mounted boot partition."""
    if not folder.is_dir():
        raise ImageError(f"--boot-dir {folder} is not a folder: give where the card's boot "
                         f"partition is mounted (bootfs, system-boot)")
    if not any((folder / marker).exists() for marker in _BOOT_MARKERS):
        raise ImageError(f"--boot-dir {folder} does not look like a Raspberry Pi boot "
                         f"partition (none of {', '.join(_BOOT_MARKERS)})")
    for name, text in files.items():
        path = folder / name
        tmp = folder / f".{name}.tmp"
        try:
            tmp.unlink(missing_ok=True)
            write_private(tmp, text)
            os.replace(tmp, path)
        except OSError as exc:
            with suppress(OSError):
                tmp.unlink()
            raise ImageError(f"cannot write {path}: {exc.strerror}") from None
    with suppress(AttributeError):
        os.sync()


def _mcopy() -> str:
    found = shutil.which("mcopy")
    if found is None:
        raise ImageError("orch image writes into the image with mtools, which is not "
                         "installed: sudo apt install mtools (Debian, Ubuntu), brew install "
                         "mtools (macOS); or flash the official image and use --boot-dir")
    return found
