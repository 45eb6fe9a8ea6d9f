#!/usr/bin/env python3
"""Adds the index Tansu 0.6.0's sqlite schema lacks.

Tansu looks up each fetched record's headers with a query on `header(topition, offset_id)`,
a table without an index: every fetched record scans every header of the broker, so reading
grows quadratically (measured: 20 000 records with one header each took over 30 s to read;
with this index 1.2 s). The index changes no data and no query result.

Usage: broker-index.py PATH/TO/tansu.db   (run after the broker created its schema)
"""
import sqlite3
import sys
import time

db = sys.argv[1]
deadline = time.time() + 30
while True:
    try:
        con = sqlite3.connect(db, timeout=10)
        con.execute("create index if not exists sieve_header_record on header (topition, offset_id)")
        con.commit()
        con.close()
        break
    except sqlite3.OperationalError as e:  # schema not created yet, or locked
        if time.time() > deadline:
            sys.exit(f"broker-index: {db}: {e}")
        time.sleep(0.1)
