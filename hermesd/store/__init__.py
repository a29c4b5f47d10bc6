"""What is on disk and how it is made: the manifest, stage detection, sources, convert, stage files."""
