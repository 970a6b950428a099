"""The model catalog: the serve spec, the model store, model folders, TotalSegmentator tasks."""
