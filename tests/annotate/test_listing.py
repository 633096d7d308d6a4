"""jobs/annotate/listing.py: lazy listing (local and a real S3 server) and manifests."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from jobs.annotate.listing import ImageSourceError, check_input, iter_image_uris, list_image_uris


def s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and keys from the s3_server env


def test_local_listing_is_recursive_filtered_and_normalized(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("one.jpg", "a/two.PNG", "a/b/three.webp", "a/b/notes.txt", "a/four.jpeg.json"):
        (tmp_path / name).write_bytes(b"x")
    listed = sorted(iter_image_uris(str(tmp_path)))
    assert listed == sorted(f"file://{tmp_path}/{n}" for n in ("one.jpg", "a/two.PNG", "a/b/three.webp"))
    assert sorted(iter_image_uris(f"file://{tmp_path}/", extensions=["png"])) == [f"file://{tmp_path}/a/two.PNG"]


def test_s3_listing_pages_through_more_than_one_listing_page(s3_bucket):
    fs = s3()
    fs.pipe({f"{s3_bucket}/photos/{i // 100:02d}/{i:05d}.jpg": b"x" for i in range(1050)})
    fs.pipe({f"{s3_bucket}/photos/readme.md": b"x", f"{s3_bucket}/photosynthesis/not-under-prefix.jpg": b"x"})
    listed = list(iter_image_uris(f"s3://{s3_bucket}/photos"))
    assert len(listed) == 1050 and len(set(listed)) == 1050  # S3 returns at most 1000 keys per page
    assert set(listed) == {f"s3://{s3_bucket}/photos/{i // 100:02d}/{i:05d}.jpg" for i in range(1050)}


def test_manifests_text_and_parquet(tmp_path, s3_bucket):
    (tmp_path / "images").mkdir()
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# comment\ns3://{s3_bucket}/x.jpg\n\n{tmp_path}/abs.png\nimages/rel.jpg\n")
    assert list(iter_image_uris(str(manifest))) == [
        f"s3://{s3_bucket}/x.jpg",
        f"file://{tmp_path}/abs.png",
        f"file://{tmp_path}/images/rel.jpg",
    ]
    table = pa.table({"path": [f"s3://{s3_bucket}/a.jpg", None, f"s3://{s3_bucket}/b.jpg"], "other": [1, 2, 3]})
    with s3().open(f"{s3_bucket}/manifest.parquet", "wb") as stream:
        pq.write_table(table, stream)
    uri = f"s3://{s3_bucket}/manifest.parquet"
    check_input(uri)
    assert list(iter_image_uris(uri, manifest_column="path")) == [f"s3://{s3_bucket}/a.jpg", f"s3://{s3_bucket}/b.jpg"]
    with pytest.raises(ImageSourceError, match=r"manifest\.parquet: no column 'uri'"):
        list(iter_image_uris(uri))


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


def test_listing_task_streams_uris_minus_completed_ones(ray_cluster, s3_bucket):
    s3().pipe({f"{s3_bucket}/in/{i:04d}.jpg": b"x" for i in range(1500)})
    done = frozenset(f"s3://{s3_bucket}/in/{i:04d}.jpg" for i in range(0, 1500, 3))
    inputs = ray_cluster.data.from_items([{"input": f"s3://{s3_bucket}/in"}])
    listed = inputs.map_batches(
        list_image_uris,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=0,
        fn_kwargs={"extensions": ["jpg"], "manifest_column": "uri", "done": done},
    )
    uris = [row["uri"] for row in listed.iter_rows()]
    assert sorted(uris) == [f"s3://{s3_bucket}/in/{i:04d}.jpg" for i in range(1500) if i % 3]
