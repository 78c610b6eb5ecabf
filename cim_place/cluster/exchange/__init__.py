"""Moving blocks between nodes: the block wire and its server, the bulk block stream, finding
holders, fetching a DAG verified, and uploading content through an agent.
"""
