"""The MBR partition table of a disk image, as data: which partition is the FAT boot
partition, and where its bytes are.

Pure: the first 512 bytes in, partition records out. Raspberry Pi OS and Ubuntu for
Raspberry Pi both ship MBR images whose first partition is FAT32 (``bootfs`` /
``system-boot``) and whose second is the ext4 root.
"""

from __future__ import annotations

from typing import NamedTuple

from orchcore.errors import ImageError

SECTOR = 512
_SIGNATURE = b"\x55\xaa"
_TABLE = 446  # offset of the four 16-byte primary partition entries
_ENTRY = 16
# The partition types a FAT boot partition carries (FAT12, FAT16 < 32 MiB, FAT16, FAT32
# CHS, FAT32 LBA, FAT16 LBA).
FAT_TYPES = {0x01: "FAT12", 0x04: "FAT16", 0x06: "FAT16", 0x0B: "FAT32", 0x0C: "FAT32 (LBA)",
             0x0E: "FAT16 (LBA)"}
GPT_PROTECTIVE = 0xEE


class Partition(NamedTuple):
    number: int  # 1..4, as Linux names them (mmcblk0p1)
    type_id: int
    start_sector: int
    sectors: int

    @property
    def offset(self) -> int:
        """Byte offset of the partition in the image."""
        return self.start_sector * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR

    @property
    def end(self) -> int:
        """Byte offset just past the partition (half-open ``[offset, end)``)."""
        return self.offset + self.size

    @property
    def is_fat(self) -> bool:
        return self.type_id in FAT_TYPES


def parse_mbr(sector: bytes, image: str = "the image") -> tuple[Partition, ...]:
    """The used primary partitions of an MBR (the image's first sector), in table order."""
    if len(sector) < SECTOR or sector[510:512] != _SIGNATURE:
        raise ImageError(f"{image} has no MBR partition table (no 55 AA signature in its "
                         f"first sector): give the official .img or .img.xz of Raspberry Pi "
                         f"OS or Ubuntu for Raspberry Pi")
    partitions = []
    for index in range(4):
        entry = sector[_TABLE + index * _ENTRY:_TABLE + (index + 1) * _ENTRY]
        type_id = entry[4]
        start = int.from_bytes(entry[8:12], "little")
        count = int.from_bytes(entry[12:16], "little")
        if type_id == 0 or count == 0:
            continue
        if type_id == GPT_PROTECTIVE:
            raise ImageError(f"{image} has a GPT partition table; orch image reads MBR images "
                             f"(those of Raspberry Pi OS and Ubuntu for Raspberry Pi)")
        partitions.append(Partition(index + 1, type_id, start, count))
    return tuple(partitions)


def boot_partition(partitions: tuple[Partition, ...], image_size: int,
                   image: str = "the image") -> Partition:
    """The first FAT partition, checked to lie inside the image."""
    fat = next((p for p in partitions if p.is_fat), None)
    if fat is None:
        found = ", ".join(f"{p.number}: type 0x{p.type_id:02x}" for p in partitions) or "none"
        raise ImageError(f"{image} has no FAT boot partition (partitions: {found}); give the "
                         f"official Raspberry Pi OS or Ubuntu for Raspberry Pi image")
    if fat.end > image_size:
        raise ImageError(f"{image}: its boot partition ends at byte {fat.end}, past the end of "
                         f"the image ({image_size} bytes): the file is cut short (download "
                         f"it again)")
    return fat
