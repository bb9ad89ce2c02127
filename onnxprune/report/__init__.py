"""What a run tells: the report records and their JSON (records.py), the printed summaries."""
