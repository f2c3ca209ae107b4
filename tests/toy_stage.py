"""A user stage, registered from outside the package the way a user would add one: this file and its
`register_stage` call are all it takes (tests/test_registry.py names it in a config's `plugins`).

`url_hosts`: one row per manifest row with the URL's host, optionally with the `www.` prefix cut. It runs after
`query` on the executor's contract like any built-in per-shard stage (claims, commits, stats by the executor).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from pipeline.registry import register_stage, section_config
from pipeline.stage import BatchResult, ShardStage
from schemas.base import TableSchema
from schemas.tables import MANIFEST

HOSTS = TableSchema("url_hosts", 1, pa.schema([pa.field("sample_id", pa.string(), False),
                                               pa.field("host", pa.string(), False)]))


class UrlHostsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strip_www: bool = True


class UrlHostsStage(ShardStage):
    name = "url_hosts"
    input_schema = MANIFEST
    output_schema = HOSTS

    def process(self, batch: pa.Table) -> BatchResult:
        rows, drops = [], {}
        for sid, url in zip(batch.column("sample_id").to_pylist(), batch.column("url").to_pylist(), strict=True):
            host = (urlsplit(url).hostname or "").lower()
            if not host:
                drops["no_host"] = drops.get("no_host", 0) + 1
                continue
            if self.config.strip_www:
                host = host.removeprefix("www.")
            rows.append({"sample_id": sid, "host": host})
        return BatchResult(HOSTS.from_rows(rows), drops)


def run(cfg, inputs, output, overwrite=False):
    from pipeline.registry import executor_from_config

    stage = UrlHostsStage(section_config(cfg, "url_hosts"))
    return executor_from_config(cfg).run(stage, inputs["query"], output, overwrite).stats


register_stage("url_hosts", __name__, needs=("query",), description="manifest -> URL hosts (a test plugin)",
               after="query", section=UrlHostsConfig)
