"""The training data by name: every folder of a data folder laid out as ../shared/asl, got from where it came.

    python data_sources.py list                                   # the sets and folders: photos, source, licence
    python data_sources.py get everyone                           # into ~/.cache/asl-toolkit/data (or $ASL_DATA_DIR)
    python data_sources.py get omega mariia --data_dir data --via archive
    python pt_train.py --data everyone --data_dir ../shared/asl --recipe quick   # training takes names too

A source is data, not code: catalog.json names each folder's GitHub repository and commit (or Kaggle dataset),
its licence and every file taken, with the source file's SHA-256, and one downloader reads it. A NAME is a set
(`everyone`: the Kaggle signer and 20 other people; `signers`) or a folder (`signers/omega` or `omega`, `train`,
`test`). A folder of DATA_DIR that already holds every file of its list is used as it is and nothing is
downloaded: `--data_dir ../shared/asl` works offline. Otherwise the missing files are fetched, `--via files` one
by one (the default), `--via archive` as the repository's archive at the commit (one download for a whole
folder); the Kaggle folders with kagglehub. Downloads go to DATA_DIR/.downloads as .part files that a rerun
resumes (an HTTP Range request); each photo is checked against its SHA-256, resized and re-encoded as the
catalog says (so it matches ../shared/asl's copies in size, not byte for byte) and written atomically. Exit code
2 means a problem to fix, explained in one line; the good files are kept, so a rerun fetches only the rest.

`resolve` is what the other commands call (pt_train.py, leave_one_out.py and evaluate.py's --data options).
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image
from tqdm import tqdm

import image_io
from errors import UsageError

log = logging.getLogger("data_sources")

EXIT_USAGE = 2
CATALOG = Path(__file__).resolve().with_name("catalog.json")
DATA_DIR_ENV = "ASL_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/asl-toolkit/data"
VIA = ("files", "archive")
# dot-named, so that data_loader never takes it for a training folder or a class
DOWNLOADS = ".downloads"
TIMEOUT_S = 60
CHUNK = 1 << 16
# the label text SOURCES.md says was painted over, in the colour ../shared/asl's copies show
GREY = (128, 128, 128)
SHOWN_FAILURES = 5  # files named in a failure's one line; the rest are counted
OFFLINE_FIX = ("with no internet, point --data_dir at a folder that already holds the data, e.g. "
               "--data_dir ../shared/asl")

Entry = dict  # one folder of catalog.json: where it comes from, its licence and its files
Item = dict  # one file of a folder: file, class, and for GitHub folders source and sha256


class DataError(UsageError):
    """A data problem the user can fix; the message names it and says how."""


class DownloadFailed(DataError):
    """One download failed (refused, cut short or not the catalog's bytes): the others go on, a rerun retries it."""


# ------------------------------------------------------------------------------------------- the catalog

def load_catalog(path: str | os.PathLike | None = None) -> dict:
    """catalog.json (or the one at `path`), parsed."""
    path = Path(path or CATALOG).expanduser()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"Cannot read the data catalog {path} ({type(err).__name__}: {err}).") from None


def short_name(folder: str) -> str:
    """What a folder is called on its own: `signers/omega` -> `omega`."""
    return PurePosixPath(folder).name


def folder_names(catalog: dict, names: list[str]) -> list[str]:
    """The catalog's folders that `names` stand for, each once: a set by its folders in the set's order, a folder
    by its path (`signers/omega`) or its own name (`omega`)."""
    by_short = {short_name(folder): folder for folder in catalog["folders"]}
    found: list[str] = []
    for name in names:
        if name in catalog["sets"]:
            found += catalog["sets"][name]
        elif name in catalog["folders"] or name in by_short:
            found.append(name if name in catalog["folders"] else by_short[name])
        else:
            raise DataError(f"No data named '{name}': name a set ({', '.join(catalog['sets'])}) or a folder "
                            f"({', '.join(by_short)}); `python data_sources.py list` shows them.")
    return list(dict.fromkeys(found))


def inside(root: Path, relative: str) -> Path:
    """`root/relative` for a catalog path, refused where it would lead outside `root` (absolute, or with `..`)."""
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts or "\\" in relative:
        raise DataError(f"The catalog names the path '{relative}', which leads outside {root}: fix the catalog.")
    return root.joinpath(*parts)


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def missing_files(folder_dir: Path, entry: Entry) -> list[Item]:
    """The files of a folder's list that `folder_dir` lacks. Only the names are checked: a stored photo is
    re-encoded, so its bytes are not the source's."""
    return [item for item in entry["files"] if not inside(folder_dir, item["file"]).is_file()]


def source_of(entry: Entry) -> str:
    """Where a folder comes from, in words: the same for folders cut from one repository or dataset."""
    if "kaggle" in entry:
        return f"Kaggle {entry['kaggle']}"
    return f"github.com/{entry['repository']} at {entry['commit'][:12]}"


# ------------------------------------------------------------------------------------------- downloading

def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def unreachable(url: str, err: BaseException) -> DataError:
    host = urllib.parse.urlsplit(url).hostname or url
    return DataError(f"Could not reach {host} ({_one_line(err)}): {OFFLINE_FIX}.")


def fetch(url: str, part: Path, label: str | None = None, timeout: float = TIMEOUT_S) -> None:
    """Download `url` into `part`, resuming what an earlier try left there with a Range request; the file is
    complete when this returns. A byte progress bar where `label` is given. DownloadFailed where the server
    refuses or the connection breaks (the part is kept for the rerun); DataError where the host is unreachable."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the part is not a beginning of this file: start it again
            part.unlink()
            return fetch(url, part, label, timeout)
        raise DownloadFailed(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise unreachable(url, err.reason if isinstance(err.reason, BaseException) else err) from None
    except (OSError, http.client.HTTPException) as err:
        raise DownloadFailed(f"the connection broke ({_one_line(err)}); run again to retry") from None
    with response:
        # a server that ignores Range answers 200 with the whole file: start the part again
        resumed = response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            part.unlink()
            raise DownloadFailed("the server resumed at another byte; run again to download it anew")
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        start = have if resumed else 0
        with part.open("ab" if resumed else "wb") as out, tqdm(
                total=None if expected is None else start + expected, initial=start, unit="B", unit_scale=True,
                desc=label, disable=label is None, leave=False) as bar:
            got = _copy(response, out, bar.update)
    if expected is not None and got < expected:
        # http.client's read() returns b"" when the server closes early: only the length tells
        raise DownloadFailed(f"cut short after {start + got} bytes; run again to resume")


def _copy(response: BinaryIO, out: BinaryIO, progress: Callable[[int], object]) -> int:
    """Copy the body into `out`; the bytes copied. A broken connection is a DownloadFailed, while a failing write
    (a full disk) stays an OSError: it is this machine's problem, not the server's."""
    got = 0
    while True:
        try:
            chunk = response.read(CHUNK)
        except (OSError, http.client.HTTPException) as err:
            raise DownloadFailed(f"the connection broke after {got} more bytes ({_one_line(err)}); run again to "
                                 "resume") from None
        if not chunk:
            return got
        out.write(chunk)
        got += len(chunk)
        progress(len(chunk))


def write_atomically(dest: Path, write: Callable[[Path], object]) -> None:
    """`write(temporary path)` beside `dest`, then rename it to `dest`: a killed run never leaves half a photo
    under its real name (the temporary name starts with a dot, which the scan skips)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def store(source: Path | BinaryIO, dest: Path, entry: Entry) -> None:
    """Write one photo as the catalog stores it: top `grey_top_rows` rows of the source painted grey, longer side
    resized to `resize_to`, JPEG at `jpeg_quality`; copied as it is where the entry says none of that."""
    if "resize_to" not in entry:
        write_atomically(dest, lambda tmp: shutil.copyfile(source, tmp))
        return
    try:
        image = image_io.load_rgb(source)
    except image_io.ImageError as err:
        raise DownloadFailed(f"not a readable photo ({err})") from None
    if entry.get("grey_top_rows"):
        image.paste(GREY, (0, 0, image.width, min(entry["grey_top_rows"], image.height)))
    scale = entry["resize_to"] / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    write_atomically(dest, lambda tmp: image.save(tmp, "JPEG", quality=entry.get("jpeg_quality", 85)))


def store_checked(data: bytes, item: Item, folder_dir: Path, entry: Entry) -> None:
    """Store a downloaded source file where its SHA-256 is the catalog's; a DownloadFailed where it is not."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != item["sha256"]:
        raise DownloadFailed(f"SHA-256 {digest[:12]}... is not the catalog's {item['sha256'][:12]}...")
    store(io.BytesIO(data), inside(folder_dir, item["file"]), entry)


def file_url(urls: dict, entry: Entry, item: Item) -> str:
    return urls["file"].format(repository=entry["repository"], commit=entry["commit"],
                               source=urllib.parse.quote(item["source"]))


def get_files(urls: dict, entry: Entry, missing: list[Item], folder_dir: Path, parts: Path) -> list[str]:
    """Fetch each missing file alone; the files that failed, each with why."""
    failed = []
    for item in tqdm(missing, desc=folder_dir.name, unit="photo"):
        part = inside(parts, item["file"] + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        try:
            fetch(file_url(urls, entry, item), part)
            data = part.read_bytes()
            part.unlink()  # whatever the check says: a wrong file must not be resumed
            store_checked(data, item, folder_dir, entry)
        except DownloadFailed as err:
            failed.append(f"{item['file']} ({err})")
    return failed


def archive_top(entry: Entry) -> str:
    """The folder a GitHub archive holds everything in: REPO-COMMIT/."""
    return f"{entry['repository'].rpartition('/')[2]}-{entry['commit']}/"


def safe_member(name: str) -> bool:
    """Whether an archive member's name stays inside the archive (no `..`, not absolute)."""
    path = PurePosixPath(name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts and ":" not in name


def get_archive(urls: dict, entry: Entry, missing: list[Item], folder_dir: Path, downloads: Path
                ) -> tuple[list[str], Path]:
    """Fetch the repository's archive at the commit (kept in `downloads` for the folders that share it) and
    extract the missing files from it; the files that failed, each with why, and the archive's path."""
    url = urls["archive"].format(repository=entry["repository"], commit=entry["commit"])
    archive_path = downloads / f"{entry['repository'].replace('/', '-')}-{entry['commit']}.zip"
    if not archive_path.is_file():
        part = archive_path.with_name(archive_path.name + ".part")
        try:
            fetch(url, part, label=archive_path.name)
        except DownloadFailed as err:
            raise DataError(f"The archive {url} did not download: {err}.") from None
        os.replace(part, archive_path)
    failed = []
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            refused = sorted(name for name in members if not safe_member(name))
            if refused:
                log.warning("Refused %d member(s) of %s that lead outside it, e.g. %s", len(refused), url, refused[0])
                for name in refused:
                    del members[name]
            for item in tqdm(missing, desc=folder_dir.name, unit="photo"):
                name = archive_top(entry) + item["source"]
                if name not in members:
                    failed.append(f"{item['file']} (not in the archive as {name})")
                    continue
                try:
                    store_checked(archive.read(members[name]), item, folder_dir, entry)
                except DownloadFailed as err:
                    failed.append(f"{item['file']} ({err})")
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        archive_path.unlink(missing_ok=True)
        raise DataError(f"The archive {archive_path.name} from {url} is damaged ({_one_line(err)}): it was "
                        "deleted; run the command again to download it anew.") from None
    return failed, archive_path


def get_kaggle(entry: Entry, missing: list[Item], folder_dir: Path) -> None:
    """Download the Kaggle dataset with kagglehub (which keeps its own cache) and copy the missing files."""
    handle = entry["kaggle"]
    try:
        import kagglehub

        root = Path(kagglehub.dataset_download(handle))
    except Exception as err:  # kagglehub raises many types (network, auth, HTTP); all mean the same here
        raise DataError(f"Could not download {handle} from Kaggle ({_one_line(err)}): {OFFLINE_FIX}.") from None
    source_dir = inside(root, entry["path"])
    absent = [item["file"] for item in missing if not inside(source_dir, item["file"]).is_file()]
    if absent:
        raise DataError(f"The Kaggle download {source_dir} lacks {len(absent)} of the catalog's files, e.g. "
                        f"{absent[0]}: the dataset changed; point --data_dir at a copy that holds them.")
    for item in tqdm(missing, desc=folder_dir.name, unit="photo"):
        store(inside(source_dir, item["file"]), inside(folder_dir, item["file"]), entry)


# ------------------------------------------------------------------------------------------- resolve

def failure_line(folder: str, total: int, failed: list[str]) -> str:
    shown = ", ".join(failed[:SHOWN_FAILURES]) + (f" and {len(failed) - SHOWN_FAILURES} more"
                                                   if len(failed) > SHOWN_FAILURES else "")
    return f"{folder}: {len(failed)} of {total} files failed: {shown}"


def resolve(names: list[str], data_dir: str | os.PathLike | None = None, catalog: str | os.PathLike | None = None,
            via: str = "files") -> list[Path]:
    """The folders `names` stand for, in DATA_DIR (default: $ASL_DATA_DIR, else ~/.cache/asl-toolkit/data), in
    the sets' order, each downloaded first where it lacks files of the catalog's list. A DataError names every
    file that failed (the good ones are kept: a rerun fetches the rest)."""
    if via not in VIA:
        raise DataError(f"--via {via}: choose {' or '.join(VIA)}.")
    cat = load_catalog(catalog)
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    wanted = [(folder, cat["folders"][folder], inside(root, folder)) for folder in folder_names(cat, names)]
    failures, told = [], set()
    for k, (folder, entry, folder_dir) in enumerate(wanted):
        missing = missing_files(folder_dir, entry)
        if not missing:
            continue
        if source_of(entry) not in told:
            told.add(source_of(entry))
            log.info("%s: from %s, licence: %s", folder, source_of(entry), entry["licence"])
        log.info("%s: %d of %d files to get into %s", folder, len(missing), len(entry["files"]), folder_dir)
        try:
            failed, archive = get_folder(cat.get("urls", {}), folder, entry, missing, root, via)
            # an archive serves every folder cut from its repository: kept until the last of them is complete
            if archive and not failed and not any(source_of(e) == source_of(entry) and missing_files(d, e)
                                                  for _, e, d in wanted[k + 1:]):
                archive.unlink()
        except OSError as err:  # the network's errors are DataErrors by now: this is a file of this machine
            raise DataError(f"Cannot write the data into {err.filename or root} ({err.strerror or _one_line(err)}):"
                            " make it writable, or give another --data_dir.") from None
        if failed:
            failures.append(failure_line(folder, len(entry["files"]), failed))
    if failures:
        raise DataError("; ".join(failures) + ". The good files are kept: run the same command again to fetch the "
                                              "rest, or point --data_dir at a copy that holds them.")
    return [folder_dir for _, _, folder_dir in wanted]


def get_folder(urls: dict, folder: str, entry: Entry, missing: list[Item], root: Path, via: str
               ) -> tuple[list[str], Path | None]:
    """Get one folder's missing files into ROOT/FOLDER the way its source allows: the files that failed, and the
    archive downloaded for it, if any."""
    downloads = root / DOWNLOADS
    downloads.mkdir(parents=True, exist_ok=True)  # fails early, and plainly, where DATA_DIR is not writable
    folder_dir = inside(root, folder)
    if "kaggle" in entry:
        get_kaggle(entry, missing, folder_dir)
        return [], None
    if via == "archive":
        return get_archive(urls, entry, missing, folder_dir, downloads)
    return get_files(urls, entry, missing, folder_dir, inside(downloads, folder)), None


# ------------------------------------------------------------------------------------------- the command

def listing(catalog: dict, data_dir: Path) -> str:
    """The sets, then each folder: photos, where from, licence, and whether DATA_DIR holds it already."""
    lines = [f"{name}: {len(folders)} folders, {sum(len(catalog['folders'][f]['files']) for f in folders)} photos"
             for name, folders in catalog["sets"].items()]
    lines.append("")
    for folder, entry in catalog["folders"].items():
        here = "here" if not missing_files(inside(data_dir, folder), entry) else "to download"
        lines.append(f"{folder}: {len(entry['files'])} photos, {source_of(entry)}, licence: {entry['licence']} "
                     f"({here})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data_dir", default=None,
                        help=f"where the folders are, or go (default: ${DATA_DIR_ENV}, else {DEFAULT_DATA_DIR})")
    common.add_argument("--catalog", default=None,
                        help=f"the data catalog (default: {CATALOG.name} beside this file)")
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[common], help="the sets and folders: photos, sources, licences")
    get = commands.add_parser("get", parents=[common], help="download what DATA_DIR lacks of the named data")
    get.add_argument("names", nargs="+", metavar="NAME", help="a set (everyone, signers) or a folder (omega, train)")
    get.add_argument("--via", choices=VIA, default="files",
                     help="files: each file alone (the default); archive: the repository's archive at the commit, "
                          "once for a folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    try:
        if args.command == "list":
            data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
            print(listing(load_catalog(args.catalog), data_dir))
        else:
            for folder in resolve(args.names, args.data_dir, args.catalog, args.via):
                print(folder)
    except UsageError as err:
        log.error("%s", err)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
