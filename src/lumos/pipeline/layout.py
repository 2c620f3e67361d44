"""Where each stage writes inside one run root (a local directory or an s3:// prefix)."""

from __future__ import annotations

from dataclasses import dataclass

HEAD_DATASET = {"i2i": "images", "t2i": "images", "novel_view": "views", "video": "clips"}


def join_uri(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


@dataclass(frozen=True)
class RunLayout:
    root: str

    def source(self, kind: str) -> str:
        return join_uri(self.root, "source", kind)

    def dataset(self, kind: str) -> str:
        return join_uri(self.root, "datasets", kind)

    def staging(self, kind: str, partition: int) -> str:
        return join_uri(self.root, "staging", kind, f"part-{partition:03d}")

    def checkpoint(self, head: str) -> str:
        return join_uri(self.root, "checkpoints", head)

    def evaluation(self, head: str) -> str:
        return join_uri(self.root, "eval", head)

    def export(self, head: str) -> str:
        return join_uri(self.root, "export", head)

    def serving(self, head: str) -> str:
        return join_uri(self.root, "serving", head)
