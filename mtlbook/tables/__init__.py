"""The book's stored result tables (``*.csv`` beside this file, shipped as package data) and
:func:`read_table`, which the chapters read them with (:mod:`mtlbook.tables.read`)."""

from .read import PACKAGE, TABLES_DIR, read_table, table_names, table_path

__all__ = ["PACKAGE", "TABLES_DIR", "read_table", "table_names", "table_path"]
