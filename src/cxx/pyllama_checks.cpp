// Input checks that need C++, compiled into pyllama._core (which is otherwise C).
//
// llama.cpp compiles lazy-grammar trigger patterns with std::regex; the constructor throws
// std::regex_error on a bad pattern, and an exception escaping llama.cpp's C API terminates
// the process.  We compile the same pattern the same way first, here, where it can be caught.

#include <cstring>
#include <exception>
#include <regex>

extern "C" int pyllama_regex_check(const char * pattern, char * err, size_t err_size) {
    try {
        std::regex re(pattern);  // same flags as llama_grammar_init_impl: ECMAScript
        (void) re;
        return 1;
    } catch (const std::exception & e) {
        if (err != nullptr && err_size > 0) {
            std::strncpy(err, e.what(), err_size - 1);
            err[err_size - 1] = '\0';
        }
    } catch (...) {
        if (err != nullptr && err_size > 0) {
            std::strncpy(err, "unknown error", err_size - 1);
            err[err_size - 1] = '\0';
        }
    }
    return 0;
}
