/**
 * Artifact upload with progress: XMLHttpRequest, because fetch cannot report how
 * much of a request body was sent. The file goes as the raw body
 * (application/octet-stream) to POST api/artifacts?name=..., never read into memory
 * by the page. The token travels only in the Authorization header, like api.js.
 */
import { ApiError, auth, setConnection } from "./api.js";

/**
 * Upload `file`; `onProgress(sent, total)` as bytes go out. Resolves with the stored
 * artifact ({id, name, size, created_at}); rejects with ApiError. `signal` aborts.
 */
export function uploadArtifact(file, onProgress, signal) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `api/artifacts?name=${encodeURIComponent(file.name)}`);
    xhr.setRequestHeader("Authorization", `Bearer ${auth.get() || ""}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded, e.total);
    });
    xhr.addEventListener("load", () => {
      setConnection(true);
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (e) { data = null; }
      if (xhr.status === 201 && data) {
        onProgress(file.size, file.size);
        resolve(data);
        return;
      }
      const message = data && typeof data.error === "string" ? data.error
        : `HTTP ${xhr.status} ${xhr.statusText}`.trim();
      reject(new ApiError(xhr.status, message, data && data.field, data));
    });
    xhr.addEventListener("error", () => {
      setConnection(false);
      reject(new ApiError(0, "The upload was cut off: the daemon cannot be reached."));
    });
    xhr.addEventListener("abort", () => {
      const e = new Error("upload aborted");
      e.name = "AbortError";
      reject(e);
    });
    if (signal) signal.addEventListener("abort", () => xhr.abort(), { once: true });
    xhr.send(file);
  });
}
