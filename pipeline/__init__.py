"""trialpipe: clinical-trial imaging ingestion (de-identify, validate, tabulate, route)."""

__version__ = "0.1.0"
