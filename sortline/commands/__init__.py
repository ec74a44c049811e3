"""The click commands of the ``sortline`` console script, one module per command group."""
