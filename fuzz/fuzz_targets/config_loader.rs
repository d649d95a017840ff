//! The configuration loader on any text: it answers with a configuration or an error,
//! never a panic (the agent reloads whatever lands in its configuration directory, or
//! whatever the Kubernetes API serves).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = weft_agent::config::load_str(std::path::Path::new("fuzz.yaml"), text);
    // The same documents as the Kubernetes API would serve them, one by one.
    if let Ok(serde_json::Value::Array(objects)) = serde_json::from_str(text) {
        // EndpointSlices are read on their own as they arrive, the rest together.
        let (slices, rest): (Vec<_>, Vec<_>) = objects
            .into_iter()
            .partition(|o| o["kind"] == "EndpointSlice");
        let slices: Vec<_> = slices
            .into_iter()
            .map(weft_agent::config::endpoint_slice_from_api)
            .collect();
        let first = weft_agent::config::from_api(rest.clone(), &slices, None);
        let _ = weft_agent::config::from_api(rest, &slices, Some(&first.config));
    }
});
