"""jobs/annotate/listing.py: folders in parallel key ranges, manifests in parallel parts, minus what is done."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

import jobs.annotate.listing as listing
from jobs.annotate.done_index import DoneIndex
from jobs.annotate.listing import (
    ImageSourceError,
    ListingPart,
    check_input,
    list_folder_part,
    manifest_boundaries,
    plan_listing,
    range_of,
    read_manifest_part,
    remaining_in_range,
)
from jobs.annotate.settings import DEFAULT_EXTENSIONS
from storage import KeyRange, filesystem_for


def s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and keys from the s3_server env


def folder_uris(uri: str, index: DoneIndex | None = None, segments=(), extensions=DEFAULT_EXTENSIONS) -> list[str]:
    parts, _ = plan_listing(uri)
    tables = [t for part in parts for t in list_folder_part(part, extensions, index, list(segments))]
    return [u for t in tables for u in t["uri"].to_pylist()]


def manifest_uris(uri: str, column: str = "uri", index: DoneIndex | None = None, segments=()) -> list[str]:
    """What the pipeline does with a manifest, in one process: parts -> key ranges -> each range's remaining URIs."""
    parts, _ = plan_listing(uri, column)
    boundaries = manifest_boundaries(parts, len(parts))
    tables = [t.append_column("range", range_of(t["uri"], boundaries)) for p in parts for t in read_manifest_part(p)]
    entries = pa.concat_tables(tables)
    remaining = []
    for value in sorted(set(entries["range"].to_pylist())):
        group = entries.filter(pa.compute.equal(entries["range"], value)).drop_columns(["range"])
        remaining += remaining_in_range(group, index, list(segments))["uri"].to_pylist()
    return remaining


def test_local_listing_is_recursive_filtered_and_normalized(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c.jpg").mkdir()  # a folder named like an image is not an object
    for name in ("one.jpg", "a/two.PNG", "a/b/three.webp", "a/b/notes.txt", "a/four.jpeg.json", "c.jpg/five.png"):
        (tmp_path / name).write_bytes(b"x")
    expected = sorted(f"file://{tmp_path}/{n}" for n in ("one.jpg", "a/two.PNG", "a/b/three.webp", "c.jpg/five.png"))
    assert folder_uris(str(tmp_path)) == expected
    pngs = [f"file://{tmp_path}/a/two.PNG", f"file://{tmp_path}/c.jpg/five.png"]
    assert folder_uris(f"file://{tmp_path}/", extensions=["png"]) == pngs


def test_s3_listing_runs_in_ranges_that_cover_every_key_once(s3_bucket, monkeypatch):
    monkeypatch.setattr(listing, "SPLIT_MIN_KEYS", 1000)  # the default keeps prefixes this small whole
    s3().pipe({f"{s3_bucket}/photos/{i // 100:02d}/{i:05d}.jpg": b"x" for i in range(1050)})
    s3().pipe({f"{s3_bucket}/photos/readme.md": b"x", f"{s3_bucket}/photosynthesis/not-under-prefix.jpg": b"x"})
    parts, _ = plan_listing(f"s3://{s3_bucket}/photos")
    assert len(parts) > 1
    listed = folder_uris(f"s3://{s3_bucket}/photos")
    assert listed == sorted(f"s3://{s3_bucket}/photos/{i // 100:02d}/{i:05d}.jpg" for i in range(1050))


def test_a_small_folder_is_listed_by_one_task(tmp_path):
    for i in range(40):
        (tmp_path / f"{i:03d}.jpg").write_bytes(b"x")
    parts, _ = plan_listing(str(tmp_path))
    assert [p.key_range for p in parts] == [KeyRange()]  # not 40 one-key parts, each a worker to start


def test_a_range_lists_from_its_last_done_key_first_and_skips_done_ones(s3_bucket):
    s3().pipe({f"{s3_bucket}/in/{i:03d}.jpg": b"x" for i in range(40)})
    uri = [f"s3://{s3_bucket}/in/{i:03d}.jpg" for i in range(40)]
    index = DoneIndex(*filesystem_for(f"s3://{s3_bucket}/out"))
    segment = index.build([pa.array(uri[:25] + [uri[30]])], ["f"])  # a killed run got to 30, skipping 25-29
    whole = ListingPart("folder", f"s3://{s3_bucket}/in")
    order = [u for t in list_folder_part(whole, ["jpg"], index, [segment]) for u in t["uri"].to_pylist()]
    assert order == uri[31:] + uri[25:30]  # new work past the last done key first, then the gap


def test_text_manifest_parts_split_lines_exactly_once(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "TEXT_PART_BYTES", 97)  # parts cut through the middle of lines
    (tmp_path / "images").mkdir()
    lines = [f"images/{i:04d}.jpg" for i in range(200)] + ["# comment", "", "images/0007.jpg", f"{tmp_path}/abs.png"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    parts, _ = plan_listing(str(tmp_path / "list.txt"))
    assert len(parts) > 20
    read = [u for p in parts for t in read_manifest_part(p) for u in t["uri"].to_pylist()]
    assert len(read) == 202  # every line once (0007 twice: it is in the file twice)
    assert sorted(manifest_uris(str(tmp_path / "list.txt"))) == sorted(
        [f"file://{tmp_path}/images/{i:04d}.jpg" for i in range(200)] + [f"file://{tmp_path}/abs.png"]
    )


def test_parquet_manifest_is_deduplicated_and_minus_done(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setattr(listing, "MANIFEST_PART_ROWS", 50)
    uris = [f"s3://{s3_bucket}/img/{i:04d}.jpg" for i in range(300)]
    table = pa.table({"path": uris + uris[:40] + [None], "other": list(range(341))})
    with s3().open(f"{s3_bucket}/manifest.parquet", "wb") as stream:
        pq.write_table(table, stream, row_group_size=25)
    uri = f"s3://{s3_bucket}/manifest.parquet"
    check_input(uri)
    assert len(plan_listing(uri, "path")[0]) == 7
    index = DoneIndex(*filesystem_for(f"s3://{s3_bucket}/out"))
    segment = index.build([pa.array(uris[100:200])], ["f"])
    assert manifest_uris(uri, "path", index, [segment]) == uris[:100] + uris[200:]
    with pytest.raises(ImageSourceError, match=r"manifest\.parquet: no column 'uri'"):
        plan_listing(uri)


def test_s3_inventory_manifest_json(s3_bucket):
    inventory = pa.table(
        {
            "bucket": [s3_bucket] * 3,
            "key": ["photos/a.jpg", "photos/b [1].jpg", "photos/c.jpg"],
            "size": [10, 20, 30],
        }
    )
    with s3().open(f"{s3_bucket}/inventory/data/part-0.parquet", "wb") as stream:
        pq.write_table(inventory, stream)
    document = {
        "sourceBucket": s3_bucket,
        "destinationBucket": f"arn:aws:s3:::{s3_bucket}",
        "fileFormat": "Parquet",
        "files": [{"key": "inventory/data/part-0.parquet", "size": 1}],
    }
    s3().pipe({f"{s3_bucket}/inventory/manifest.json": json.dumps(document).encode()})
    parts, _ = plan_listing(f"s3://{s3_bucket}/inventory/manifest.json")
    (table,) = [t for p in parts for t in read_manifest_part(p)]
    assert table["uri"].to_pylist() == [f"s3://{s3_bucket}/photos/{n}" for n in ("a.jpg", "b [1].jpg", "c.jpg")]
    assert table["size"].to_pylist() == [10, 20, 30]


def test_presigned_manifest_entries_keep_their_secret_out_of_the_uri(tmp_path):
    signed = "https://bucket.example/a.jpg?X-Amz-Credential=AKIA%2F&X-Amz-Signature=deadbeef"
    (tmp_path / "list.txt").write_text(f"{signed}\nhttps://user:pw@host.example/b.jpg\n")
    parts, _ = plan_listing(str(tmp_path / "list.txt"))
    (table,) = [t for p in parts for t in read_manifest_part(p)]
    assert table["uri"].to_pylist() == ["https://bucket.example/a.jpg", "https://host.example/b.jpg"]
    assert table["source"].to_pylist() == [signed, "https://user:pw@host.example/b.jpg"]


def test_check_input_names_the_problem(tmp_path, s3_bucket):
    (tmp_path / "photo.jpg").write_bytes(b"x")
    check_input(str(tmp_path))
    with pytest.raises(ImageSourceError, match="missing: no such folder or prefix"):
        check_input(str(tmp_path / "missing"))
    with pytest.raises(ImageSourceError, match=r"photo\.jpg: is a file, expected a folder"):
        check_input(str(tmp_path / "photo.jpg"))
    with pytest.raises(ImageSourceError, match=r"list\.txt: no such manifest file"):
        check_input(f"s3://{s3_bucket}/list.txt")
    with pytest.raises(ImageSourceError, match="no such folder or prefix"):
        check_input(f"s3://{s3_bucket}/nothing-here")
    with pytest.raises(ImageSourceError, match="no such folder or prefix"):
        check_input("s3://no-such-bucket-here/images")
    s3fs.S3FileSystem(skip_instance_cache=True).pipe({f"{s3_bucket}/photos/a.jpg": b"x"})
    check_input(f"s3://{s3_bucket}/photos")
    check_input(f"s3://{s3_bucket}/photos/")
    with pytest.raises(ImageSourceError, match=r"a\.jpg: is a file, expected a folder"):
        check_input(f"s3://{s3_bucket}/photos/a.jpg")
    with pytest.raises(ImageSourceError, match=r"^https://h\.example/l\.txt: ") as error:
        check_input("https://h.example/l.txt?X-Amz-Signature=secret")
    assert "secret" not in str(error.value)
