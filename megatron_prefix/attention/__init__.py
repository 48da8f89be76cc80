"""Shared-prefix core attention: per-batch metadata and backends (dense, flex, varlen)."""
