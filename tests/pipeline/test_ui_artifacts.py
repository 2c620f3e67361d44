"""What the KFP UI shows of a step: the texts behind the Markdown and HTML artifacts."""

from __future__ import annotations

from lumos.pipeline.ui_artifacts import (
    ingest_counts,
    ingest_markdown,
    loss_curve_html,
    promotion_markdown,
)


def test_ingest_counts_and_table_show_rejections_by_reason() -> None:
    images = {"listed": 10, "ingested": 6, "rejected": 3, "duplicate": 1,
              "rejected_by_reason": {"too_small": 2, "unreadable": 1}}  # fmt: skip
    results = {"images": images, "views": {"ingested": 0, "no_source": True}}
    counts = ingest_counts("images", images)
    assert counts["images_ingested"] == 6 and counts["images_rejected_too_small"] == 2
    text = ingest_markdown(results, {"images": 6, "views": 0})
    assert "| images | 10 | 6 | 0 | 0 | 1 | 3 |" in text
    assert "| images | too_small | 2 |" in text and "| views | no source |" in text
    assert "**6 new items**" in text


def test_loss_curve_plots_every_logged_step() -> None:
    page = loss_curve_html("t2i", [(50, 1.0), (100, 0.5), (150, 0.25)], 123.4)
    points = page.split('points="')[1].split('"')[0].split()
    assert len(points) == 3 and points[0].startswith("40.0,")  # first step at the left edge
    assert float(points[0].split(",")[1]) < float(points[2].split(",")[1])  # loss goes down
    assert "123.4 images/s" in page
    assert "no steps logged" in loss_curve_html("i2i", [], None)


def test_promotion_says_what_was_decided_and_on_what() -> None:
    promoted = {"head": "t2i", "promoted": True, "version": "v3", "previous_version": "v2",
                "model_uri": "s3://m/t2i/v3", "inference_service_name": "lumos-t2i",
                "record_uri": "s3://r/t2i/v3.json", "reasons": [], "warnings": []}  # fmt: skip
    text = promotion_markdown(promoted, {"metrics": {"fid": 12.5}, "reasons": []})
    assert "promoted version v3 (previously v2)" in text and "| fid | 12.5 |" in text
    refused = {**promoted, "promoted": False, "reasons": ["v2 is current since evaluation"]}
    assert "- v2 is current since evaluation" in promotion_markdown(refused, {})
