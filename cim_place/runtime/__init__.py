"""What every long-running cim-place process needs: stopping tasks reliably, metrics endpoints,
logging.
"""
