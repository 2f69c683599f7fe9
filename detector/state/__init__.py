"""Key state beyond one process: snapshots to the state topic and the restore from them."""
