"""Message codes of the data plane (router <-> replica). Messages are plain tuples.

Requests (router -> replica), first two items `(rid, kind, ...)`:
  CALL    (rid, CALL, method, args, kwargs, meta)
  STREAM  (rid, STREAM, method, args, kwargs, meta)   results come back as YIELD frames
  HTTP    (rid, HTTP, scope, body, meta)
  CANCEL  (rid, CANCEL)
Replies (replica -> router), `(rid, code, ...)`:
  OK      (rid, OK, result)
  ERR     (rid, ERR, exception_or_None, traceback_text, type_name)
  HFULL   (rid, HFULL, status, headers, body)          a whole HTTP response in one frame
  HSTART  (rid, HSTART, status, headers)               then CHUNKs, then END
  CHUNK   (rid, CHUNK, data)
  YIELD   (rid, YIELD, item)
  END     (rid, END)
`meta` is None or a dict: request_id, multiplexed_model_id, route, ...
"""

CALL, STREAM, HTTP, CANCEL = 0, 1, 2, 3
OK, ERR, HFULL, HSTART, CHUNK, YIELD, END = 0, 1, 2, 3, 4, 5, 6
