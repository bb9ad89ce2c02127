"""Step 3, score: one importance criterion per module (magnitude.py, from_data.py,
random.py), the table of criteria (criteria.py), and the statistics the data criteria and
compensation measure on calibration data (calibration.py)."""
