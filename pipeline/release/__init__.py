"""The release folder: manifest, verification and signing, reports, fan-out and collect."""
