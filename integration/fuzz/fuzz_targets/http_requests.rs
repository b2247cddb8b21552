#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| grove_api::http::fuzzing::http_requests(data));
